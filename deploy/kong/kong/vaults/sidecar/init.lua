-- kong.vaults.sidecar: a Kong vault whose backend is secret-sidecar, so Kong holds
-- no backend credentials. Kong calls get(conf, resource, version) with the secret id
-- of a reference (its key and query already taken off by Kong); this asks the sidecar
-- for the whole secret and Kong extracts the key from the JSON, as it does for its own
-- backends. The sidecar's answer is read by the shared client `secret_sidecar`
-- (deploy/kong/secret_sidecar.lua), which must be on lua_package_path too.
--
-- Two ways to name the sidecar vault:
--   * a vault entity with config.vault: {prefix = "aws-prod", name = "sidecar",
--     config = {vault = "aws-prod"}} turns {vault://aws-prod/db/creds/password} into
--     get(conf, "db/creds") and asks the sidecar for {vault://aws-prod/db/creds/};
--   * without config.vault, the secret id's first segment names it:
--     {vault://sidecar/aws-prod/db/creds/password} asks for the same.

local client = require "secret_sidecar"

local ngx = ngx
local fmt = string.format
local byte = string.byte
local find = string.find
local gsub = string.gsub
local match = string.match
local sub = string.sub
local floor = math.floor
local tostring = tostring
local type = type


local VAULT_NAME = "^[a-z][a-z%d-]*[a-z%d]$" -- a sidecar vault prefix or backend name


--- A path segment as the sidecar reads it: it percent-decodes each segment twice, as
--- Kong does, so a reserved byte is sent as %25XX and arrives as the byte Kong gave us.
local function encode_segment(segment)
  return (gsub(segment, "[^%w%-%._~]", function(c) return fmt("%%25%02X", byte(c)) end))
end


--- The reference the sidecar is asked for, or nil and why not.
local function sidecar_reference(conf, resource, version)
  if type(resource) ~= "string" or resource == "" then
    return nil, "no secret id"
  end
  local vault, secret_id = conf.vault, resource
  if vault == nil or vault == ngx.null then
    local slash = find(resource, "/", 1, true)
    if not slash then
      return nil, fmt("secret id %q names no sidecar vault: use {vault://<this vault>/"
        .. "<sidecar vault>/<secret id>/<key>}, or a trailing / for a secret without key",
        resource)
    end
    vault, secret_id = sub(resource, 1, slash - 1), sub(resource, slash + 1)
  end
  if type(vault) ~= "string" or not match(vault, VAULT_NAME) then
    return nil, fmt("%q is not a sidecar vault name", tostring(vault))
  end
  if not match(secret_id, "[^/]") then
    return nil, fmt("no secret id after the sidecar vault %q", vault)
  end

  local version_part = ""
  if version ~= nil and version ~= ngx.null then
    if type(version) ~= "number" or version < 0 or version % 1 ~= 0 or version >= 2^53 then
      return nil, fmt("invalid version %s", tostring(version))
    end
    version_part = fmt("#%d", version)
  end
  -- the trailing / asks for the whole secret, whatever its id's last segment is
  return "{vault://" .. vault .. "/" .. gsub(secret_id, "[^/]+", encode_segment) .. "/"
    .. version_part .. "}"
end


--- Kong's ttl for a value: the sidecar's remaining freshness in whole seconds, at least
--- 1 (Kong reads 0 or less as "never expires"); nil when the sidecar does not rotate
--- it (its ttl 0), so Kong uses this vault's own `ttl`.
local function ttl_of(answer)
  local expires_in = answer.expires_in_seconds
  if type(expires_in) ~= "number" then
    return nil
  end
  local ttl = floor(expires_in)
  if ttl < 1 then
    return 1 -- stale: expired in the sidecar, so Kong asks again at its next rotation
  end
  return ttl
end


local function init()
  -- nothing to prepare: connections are opened on first use (cosockets are not
  -- available in the phase Kong calls init from)
end


--- Kong's vault strategy: the secret's whole value (a JSON string when Kong is to
--- extract a key), nil, and its ttl; or nil and an error naming the sidecar's code.
local function get(conf, resource, version)
  local ref, err = sidecar_reference(conf, resource, version)
  if not ref then
    return nil, "sidecar vault: " .. err
  end
  local answer
  answer, err = client.fetch(ref, { socket_path = conf.socket_path, timeout = conf.timeout })
  if not answer then
    return nil, err
  end
  return answer.value, nil, ttl_of(answer)
end


return {
  name = "sidecar",
  VERSION = "0.1.0",
  init = init,
  get = get,
}
