-- Test stand-in for Kong's bundled HashiCorp Vault vault, `kong.vaults.hcv` (Kong
-- Enterprise's kong/vaults/hcv/init.lua and kube.lua, whose licence keeps them out of
-- this tree), for tests/kong/test_facade_lua.py: it sends the requests that vault
-- sends and reads the answers as it does, written from reading it. Kong's HTTP client
-- there is lua-resty-http (through resty.luasocket.http), which Debian does not
-- package, so `request_uri` below writes the bytes lua-resty-http 0.17 writes for
-- these two calls and reads the answer the same way, on a pooled cosocket:
--
--   GET /v1/<mount>/data/<resource>[?version=<n>] HTTP/1.1     kv "v2"
--   GET /v1/<mount>/<resource> HTTP/1.1                        kv "v1" (Kong's default)
--   X-Vault-Token: <token>
--   X-Vault-Namespace: <namespace>        only when the vault config has one
--   Host: <host>:<port>                   (the port left out when it is 80)
--   User-Agent: lua-resty-http/0.17.2 (Lua) ngx_lua/<version>
--
--   POST /v1/auth/<kube_auth_path>/login HTTP/1.1             auth_method "kubernetes"
--   X-Vault-Namespace: <namespace, else "root">
--   Content-Length: <n>                   (no Content-Type)
--   Host, User-Agent as above
--
--   {"jwt":"<contents of kube_api_token_file>","role":"<kube_role, else default>"}
--
-- <resource> is the reference's resource as Kong's PDK percent-decoded it, put in the
-- URL as it is (not escaped again); the mount loses a leading and a trailing "/".
-- Answers: 404 is the error "not found"; any other status outside 200-299 is an error
-- whose text is the response body; a 2xx body must decode to an object whose `data` is
-- an object (for v2, whose `data.data` is), which is encoded to JSON again and returned
-- with no ttl, so Kong caches it for the vault config's own `ttl`. lease_duration,
-- metadata and every response header are ignored. A login's auth.client_token is kept
-- for auth.lease_duration seconds (Kong: kong.cache, where 0 means forever; here a
-- per-worker table) and is not dropped when a read is refused with it.

local cjson = require("cjson.safe").new()

local fmt = string.format

local _M = { name = "hcv" }

-- what the test reads back (GET /hcv-stats): requests sent, connections reused, logins
_M.stats = { requests = 0, reused = 0, logins = 0 }

local TIMEOUT = 5000
local USER_AGENT = "lua-resty-http/0.17.2 (Lua) ngx_lua/" .. ngx.config.ngx_lua_version
local TOKENS = {} -- login cache key -> { token = ..., expires = ngx.now() + ttl | nil }


local function read_body(sock, headers)
  local length = tonumber(headers["content-length"])
  if length then
    return sock:receive(length)
  end
  if (headers["transfer-encoding"] or ""):lower():find("chunked", 1, true) then
    local parts = {}
    while true do
      local line, err = sock:receive("*l")
      if not line then
        return nil, err
      end
      local size = tonumber(line:match("^%x+"), 16)
      if not size then
        return nil, "bad chunk size"
      end
      if size == 0 then
        sock:receive("*l") -- the empty line after the last chunk (no trailers sent)
        return table.concat(parts)
      end
      local chunk
      chunk, err = sock:receive(size)
      if not chunk then
        return nil, err
      end
      parts[#parts + 1] = chunk
      sock:receive("*l")
    end
  end
  headers.connection = "close" -- the body ends where the connection does
  return sock:receive("*a")
end


-- lua-resty-http's request_uri for an http:// URL: connect (from the keep-alive pool
-- named host:port), send, read status, headers and body, back to the pool unless the
-- server said close. Returns { status, headers, body } or nil, err.
local function request_uri(host, port, method, path, headers, body)
  local sock = ngx.socket.tcp()
  sock:settimeout(TIMEOUT)
  local ok, err = sock:connect(host, port)
  if not ok then
    return nil, err
  end
  if sock:getreusedtimes() > 0 then
    _M.stats.reused = _M.stats.reused + 1
  end
  _M.stats.requests = _M.stats.requests + 1

  local lines = { fmt("%s %s HTTP/1.1", method, path) }
  for _, header in ipairs(headers) do
    if header[2] ~= nil then
      lines[#lines + 1] = header[1] .. ": " .. header[2]
    end
  end
  if body then
    lines[#lines + 1] = "Content-Length: " .. #body
  end
  lines[#lines + 1] = "Host: " .. (port == 80 and host or host .. ":" .. port)
  lines[#lines + 1] = "User-Agent: " .. USER_AGENT
  ok, err = sock:send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or ""))
  if not ok then
    sock:close()
    return nil, err
  end

  local status_line
  status_line, err = sock:receive("*l")
  if not status_line then
    sock:close()
    return nil, err
  end
  local status = tonumber(status_line:match("^HTTP/1%.[01] (%d%d%d)"))
  if not status then
    sock:close()
    return nil, "bad status line"
  end
  local response_headers = {}
  while true do
    local line
    line, err = sock:receive("*l")
    if not line then
      sock:close()
      return nil, err
    end
    if line == "" then
      break
    end
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    if name then
      response_headers[name:lower()] = value
    end
  end
  local response_body
  response_body, err = read_body(sock, response_headers)
  if not response_body then
    sock:close()
    return nil, err
  end
  if (response_headers.connection or ""):lower():find("close", 1, true) then
    sock:close()
  else
    sock:setkeepalive()
  end
  return { status = status, headers = response_headers, body = response_body }
end


local function trim_slashes(text)
  return (text:gsub("^/", ""):gsub("/$", ""))
end


local function kubernetes_login(conf)
  local role = conf.kube_role or "default"
  local file, err = io.open(conf.kube_api_token_file
                            or "/run/secrets/kubernetes.io/serviceaccount/token", "rb")
  if not file then
    ngx.log(ngx.ERR, "[hcv] error loading kubernetes service account jwt: ", err)
    return nil
  end
  local jwt = file:read("*a")
  file:close()
  local auth_path = trim_slashes(conf.kube_auth_path or "kubernetes")
  local body = cjson.encode({ jwt = jwt, role = role })
  _M.stats.logins = _M.stats.logins + 1
  local res
  res, err = request_uri(conf.host, conf.port, "POST", "/v1/auth/" .. auth_path .. "/login",
                         { { "X-Vault-Namespace", conf.namespace or "root" } }, body)
  if not res then
    ngx.log(ngx.ERR, "[hcv] failure when exchanging the jwt for a vault token: ", err)
    return nil
  end
  if res.status ~= 200 then
    ngx.log(ngx.ERR, "[hcv] invalid response code ", res.status,
            " received when exchanging the jwt for a vault token: ", res.body)
    return nil
  end
  local answer = cjson.decode(res.body)
  return answer.auth.client_token, answer.auth.lease_duration
end


local function vault_token(conf)
  if conf.auth_method == "token" then
    return conf.token
  elseif conf.auth_method == "kubernetes" then
    local key = fmt("%s:%s:%s:%s", conf.host, conf.port, conf.kube_role, conf.kube_auth_path)
    local cached = TOKENS[key]
    if cached and (cached.expires == nil or cached.expires > ngx.now()) then
      return cached.token
    end
    local token, ttl = kubernetes_login(conf)
    if not token then
      TOKENS[key] = nil
      return nil
    end
    TOKENS[key] = { token = token, expires = (ttl or 0) > 0 and ngx.now() + ttl or nil }
    return token
  end
  ngx.log(ngx.ERR, "[hcv] vault authentication mechanism ", conf.auth_method,
          " is not supported for hashicorp vault")
end


local function request(conf, resource, version)
  local mount = trim_slashes(conf.mount or "secret")
  local path
  if conf.kv == "v2" then
    path = fmt("/v1/%s/data/%s", mount, resource)
    if version then
      path = path .. fmt("?version=%d", version)
    end
  else
    path = fmt("/v1/%s/%s", mount, resource)
  end
  conf = {
    token = conf.token, auth_method = conf.auth_method or "token", namespace = conf.namespace,
    host = conf.host or "127.0.0.1", port = conf.port or 8200,
    kube_role = conf.kube_role, kube_auth_path = conf.kube_auth_path,
    kube_api_token_file = conf.kube_api_token_file,
  }
  local token = vault_token(conf)
  if not token then
    return nil, "no authentication mechanism worked for vault"
  end
  local res, err = request_uri(conf.host, conf.port, "GET", path,
                               { { "X-Vault-Token", token },
                                 { "X-Vault-Namespace", conf.namespace } })
  if not res then
    return nil, err
  end
  if res.status == 404 then
    return nil, "not found"
  elseif res.status < 200 or res.status >= 300 then
    return nil, res.body
  end
  return res.body
end


function _M.get(conf, resource, version)
  local body, err = request(conf, resource, version)
  if not body then
    return nil, fmt("unable to retrieve secret from vault: %s", err)
  end
  local json
  json, err = cjson.decode(body)
  if type(json) ~= "table" then
    return nil, fmt("unable to json decode value received from vault: %s",
                    err or fmt("invalid type (%s), table expected", type(json)))
  end
  local data = json.data
  if type(data) ~= "table" then
    return nil, fmt("invalid data received from vault: invalid type (%s), table expected",
                    type(data))
  end
  if conf.kv == "v2" then
    data = data.data
    if type(data) ~= "table" then
      return nil, fmt("invalid data (v2) received from vault: invalid type (%s), table "
                      .. "expected", type(data))
    end
  end
  local encoded
  encoded, err = cjson.encode(data)
  if not encoded then
    return nil, fmt("unable to json encode data received from vault: %s", err)
  end
  return encoded
end


return _M
