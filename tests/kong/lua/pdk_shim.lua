-- Test stand-in for the part of Kong's vault PDK (kong/pdk/vault.lua) that calls a
-- vault strategy, and ONLY that part, so the sidecar vault runs here as it runs in Kong:
--
--   * parse a reference into name, resource, key, version and query config as
--     parse_reference does (each path segment percent-decoded twice, a trailing /
--     making the whole path the resource, the fragment a decimal version);
--   * find the strategy by name or through a vault entity's prefix, require
--     kong.vaults.<name> and kong.vaults.<name>.schema, call strategy.init() once;
--   * build the conf table as get_vault_config_and_hash does: the schema's fields
--     only, a reference's query over the base config (an entity's config, or for a
--     vault used by name the defaults of its required fields), numbers inferred;
--   * call strategy.get(conf, resource, version) and, for a reference with a key,
--     extract it from the JSON value as invoke_strategy / extract_key_from_json_string
--     do, with their error messages.
--
-- Not mimicked: schema validation, Kong's LRU/shared-dictionary caches, rotation,
-- resurrection. `kong.log` is shimmed onto ngx.log for code that logs through it.

local cjson = require "cjson.safe"

local fmt = string.format

local _M = {}

local ENTITIES = {} -- prefix -> { name = ..., config = { ... } }
local BASE = {} -- vault name -> base config (Kong's KONG_VAULT_<NAME>_<FIELD>)
local LOADED = {} -- vault name -> { strategy, schema fields }


local function logger(level)
  return function(...) ngx.log(level, ...) end
end


function _M.setup(options)
  ENTITIES = options.entities or {}
  BASE = options.base or {}
  _G.kong = _G.kong or {
    log = {
      debug = logger(ngx.DEBUG), info = logger(ngx.INFO), notice = logger(ngx.NOTICE),
      warn = logger(ngx.WARN), err = logger(ngx.ERR), crit = logger(ngx.CRIT),
    },
  }
end


local function percent_decode(text) -- luasocket's url.unescape: %XX only
  return (text:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end


local function parse_reference(reference)
  local inner = reference:match("^{vault://(.*)}$")
  if not inner then
    return nil, fmt("not a reference [%s]", reference)
  end
  local rest, fragment = inner:match("^([^#]*)#(.*)$")
  inner = rest or inner
  local query
  rest, query = inner:match("^([^?]*)%?(.*)$")
  inner = rest or inner
  local name, path = inner:match("^([^/]+)(/.*)$")
  if not name then
    return nil, fmt("reference url is missing host or path [%s]", reference)
  end
  local parts = {}
  for segment in path:gmatch("[^/]+") do
    parts[#parts + 1] = ngx.unescape_uri(percent_decode(segment))
  end
  if #parts == 0 then
    return nil, fmt("reference url has invalid path [%s]", reference)
  end
  local resource, key
  if #parts == 1 then
    resource = parts[1]
  elseif path:sub(-1) == "/" then
    resource = table.concat(parts, "/")
  else
    resource = table.concat(parts, "/", 1, #parts - 1)
    key = parts[#parts]
  end
  local version
  if fragment then
    version = tonumber(fragment, 10)
    if not version then
      return nil, fmt("reference url has invalid version [%s]", reference)
    end
  end
  return {
    name = name, resource = resource, key = key, version = version,
    config = query and query ~= "" and ngx.decode_args(query) or nil,
  }
end


local function load(name)
  local loaded = LOADED[name]
  if not loaded then
    local strategy = require("kong.vaults." .. name)
    local schema = require("kong.vaults." .. name .. ".schema")
    local fields
    for _, field in ipairs(schema.fields) do
      if field.config then
        fields = field.config.fields
      end
    end
    if type(strategy.init) == "function" then
      strategy.init()
    end
    loaded = { strategy = strategy, fields = fields }
    LOADED[name] = loaded
  end
  return loaded
end


local function defaults(fields, config)
  local out = {}
  for _, field in ipairs(fields) do
    local k, f = next(field)
    if f.required and f.default ~= nil then
      out[k] = f.default
    end
  end
  for k, v in pairs(config or {}) do
    out[k] = v
  end
  return out
end


local function vault_config(fields, base, overrides)
  local config = {}
  overrides = overrides or {}
  for _, field in ipairs(fields) do
    local k, f = next(field)
    local v = overrides[k] or base[k]
    if v ~= nil and (f.type == "number" or f.type == "integer") then
      v = tonumber(v)
    end
    if v ~= nil then
      config[k] = v
    end
  end
  return config
end


local function extract_key(value, key)
  local json, err = cjson.decode(value)
  if type(json) ~= "table" then
    return nil, fmt("unable to json decode value: %s", err or type(json))
  end
  local field = json[key]
  if field == nil then
    return nil, fmt("subfield %s not found in JSON secret", key)
  elseif type(field) ~= "string" then
    return nil, fmt("unexpected %s value in JSON secret for subfield %s", type(field), key)
  end
  return field
end


--- What Kong's vault PDK makes of `reference`: value, err, and the strategy's ttl.
function _M.resolve(reference)
  local parsed, err = parse_reference(reference)
  if not parsed then
    return nil, err
  end
  local name, base = parsed.name, nil
  local entity = ENTITIES[name]
  if entity then
    name = entity.name
    base = defaults(load(name).fields, entity.config)
  else
    base = defaults(load(name).fields, BASE[name])
  end
  local loaded = load(name)
  local config = vault_config(loaded.fields, base, parsed.config)

  local value, ttl
  value, err, ttl = loaded.strategy.get(config, parsed.resource, parsed.version)
  if value == nil then
    return nil, err and fmt("no value found (%s)", err) or "no value found"
  elseif type(value) ~= "string" then
    return nil, fmt("value returned from vault has invalid type (%s), string expected",
                    type(value))
  end
  if parsed.key then
    value, err = extract_key(value, parsed.key)
    if not value then
      return nil, fmt("could not get subfield value: %s", err)
    end
  end
  return value, nil, ttl
end


return _M
