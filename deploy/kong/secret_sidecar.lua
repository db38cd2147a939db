-- secret_sidecar: read a vault reference from secret-sidecar over its Unix socket.
--
--   local sidecar = require "secret_sidecar"
--   local value, err = sidecar.get("{vault://aws-prod/db/password}")
--   local answer, err, code = sidecar.fetch(ref, { socket_path = ..., timeout = 2000 })
--
-- The one HTTP client of this repository's Lua code: plain OpenResty calls `get`, the
-- Kong vault `kong.vaults.sidecar` calls `fetch`. It uses only what OpenResty and Kong
-- ship: cosockets (`ngx.socket.tcp` on a `unix:` path) and cjson. Connections go back
-- to the worker's cosocket pool after each answer, so a worker keeps one connection
-- per concurrent request.
--
-- Cosockets work in the rewrite, access and content phases and in timers. Kong also
-- resolves references in init (a DB-less declarative config is warmed up there), where
-- they do not: in those phases a blocking LuaSocket `socket.unix` connection is used
-- if LuaSocket is installed (Kong ships it, as its own vaults rely on it there), one
-- request per connection; without LuaSocket such a call fails with an error.
--
-- Errors read "secret-sidecar: <code>: <message>": the sidecar's own error code and
-- message (which never hold a value), or `daemon_unreachable` and what failed on the
-- socket. No value is ever logged or put in an error message.

local cjson = require("cjson.safe")

local ngx = ngx
local fmt = string.format
local byte = string.byte
local find = string.find
local gsub = string.gsub
local lower = string.lower
local match = string.match
local concat = table.concat
local floor = math.floor
local pcall = pcall
local require = require
local setmetatable = setmetatable
local tonumber = tonumber
local tostring = tostring
local type = type

local _M = { _VERSION = "0.1.0" }

_M.DEFAULT_SOCKET_PATH = "/var/run/secret-sidecar/sidecar.sock"
_M.DEFAULT_TIMEOUT = 2000 -- milliseconds for a whole call, a retry included

local KEEPALIVE_IDLE = 60000 -- ms a pooled connection may idle: below the daemon's 75 s
local POOL_SIZE = 16 -- pooled connections per worker
local MAX_BODY = 4 * 1024 * 1024 -- bytes: the largest answer read
local MAX_HEADERS = 100
local USER_AGENT = "secret-sidecar-lua/" .. _M._VERSION

local UNREACHABLE = "daemon_unreachable"

-- where ngx.socket.tcp can be used (lua-nginx-module's "yieldable" contexts)
local COSOCKET_PHASES = {
  rewrite = true, server_rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true, preread = true,
}


--- A blocking LuaSocket Unix connection behind the few cosocket methods used here.
local Blocking = {}
Blocking.__index = Blocking

function Blocking:settimeout(ms) self.sock:settimeout(ms / 1000) end
function Blocking:connect(path) return self.sock:connect((gsub(path, "^unix:", ""))) end
function Blocking:send(data) return self.sock:send(data) end
function Blocking:receive(pattern) return self.sock:receive(pattern) end
function Blocking:getreusedtimes() return 0 end
function Blocking:setkeepalive() return self.sock:close() end
function Blocking:close() return self.sock:close() end


--- A socket usable in the current phase, or nil and why not.
local function new_socket()
  local phase = ngx.get_phase()
  if COSOCKET_PHASES[phase] then
    return ngx.socket.tcp()
  end
  local ok, unix = pcall(require, "socket.unix")
  if not ok then
    return nil, "cosockets are not available in the " .. phase .. " phase and LuaSocket "
      .. "(socket.unix) is not installed"
  end
  local sock, err = (type(unix) == "table" and unix.stream or unix)()
  if not sock then
    return nil, "socket.unix: " .. tostring(err)
  end
  return setmetatable({ sock = sock }, Blocking)
end


--- Percent-encode everything but RFC 3986's unreserved characters.
local function escape(text)
  return (gsub(text, "[^%w%-%._~]", function(c) return fmt("%%%02X", byte(c)) end))
end
_M.escape = escape


--- Milliseconds left before `deadline` (seconds, ngx.now() scale), or nil once past.
local function left(deadline)
  ngx.update_time()
  local ms = floor((deadline - ngx.now()) * 1000)
  if ms < 1 then
    return nil
  end
  return ms
end


local function receive(sock, deadline, pattern)
  local ms = left(deadline)
  if not ms then
    return nil, "timeout"
  end
  sock:settimeout(ms)
  return sock:receive(pattern)
end


local function read_chunked(sock, deadline)
  local parts, size = {}, 0
  while true do
    local line, err = receive(sock, deadline, "*l")
    if not line then
      return nil, "reading a chunk size: " .. err
    end
    local n = tonumber(match(line, "^%s*(%x+)"), 16)
    if not n then
      return nil, "malformed chunk size"
    end
    if n == 0 then
      repeat -- trailer fields, then the empty line
        line, err = receive(sock, deadline, "*l")
        if not line then
          return nil, "reading the chunked trailer: " .. err
        end
      until line == ""
      return concat(parts)
    end
    size = size + n
    if size > MAX_BODY then
      return nil, "answer larger than " .. MAX_BODY .. " bytes"
    end
    local data
    data, err = receive(sock, deadline, n)
    if not data then
      return nil, "reading a chunk: " .. err
    end
    parts[#parts + 1] = data
    line, err = receive(sock, deadline, 2)
    if line ~= "\r\n" then
      return nil, "malformed chunk end" .. (err and (": " .. err) or "")
    end
  end
end


local function read_to_close(sock, deadline)
  local parts, size = {}, 0
  while true do
    local data, err, partial = receive(sock, deadline, 8192)
    data = data or partial
    if data and data ~= "" then
      size = size + #data
      if size > MAX_BODY then
        return nil, "answer larger than " .. MAX_BODY .. " bytes"
      end
      parts[#parts + 1] = data
    end
    if err == "closed" then
      return concat(parts)
    elseif err then
      return nil, "reading the body: " .. err
    end
  end
end


--- Send the request and read one answer: status, body, whether the connection must
--- close afterwards; or nil and what failed.
local function exchange(sock, request, deadline)
  local ms = left(deadline)
  if not ms then
    return nil, "timeout"
  end
  sock:settimeout(ms)
  local sent, err = sock:send(request)
  if not sent then
    return nil, "sending the request: " .. err
  end

  local line
  line, err = receive(sock, deadline, "*l")
  if not line then
    return nil, "reading the status line: " .. err
  end
  local version, status = match(line, "^HTTP/1%.([01]) (%d%d%d)")
  status = tonumber(status)
  if not status then
    return nil, "the answer is not HTTP/1.x"
  end

  local length, chunked, close = nil, false, version == "0"
  local count = 0
  while true do
    line, err = receive(sock, deadline, "*l")
    if not line then
      return nil, "reading the headers: " .. err
    end
    if line == "" then
      break
    end
    local name, value = match(line, "^([^:]+):%s*(.-)%s*$")
    if name then
      name, value = lower(name), lower(value)
      if name == "content-length" then
        length = tonumber(value)
        if not length or length < 0 then
          return nil, "malformed Content-Length"
        end
      elseif name == "transfer-encoding" then
        chunked = find(value, "chunked", 1, true) ~= nil
      elseif name == "connection" then
        if find(value, "close", 1, true) then
          close = true
        elseif find(value, "keep-alive", 1, true) then
          close = false
        end
      end
    end
    count = count + 1
    if count > MAX_HEADERS then
      return nil, "more than " .. MAX_HEADERS .. " header lines"
    end
  end

  local body
  if chunked then
    body, err = read_chunked(sock, deadline)
  elseif length then
    if length > MAX_BODY then
      return nil, "answer larger than " .. MAX_BODY .. " bytes"
    end
    if length == 0 then
      body = ""
    else
      body, err = receive(sock, deadline, length)
      if not body then
        err = "reading the body: " .. err
      end
    end
  else -- neither: the body ends when the daemon closes the connection
    body, err = read_to_close(sock, deadline)
    close = true
  end
  if not body then
    return nil, err
  end
  return status, body, close
end


--- The sidecar's answer to `ref` (a table: value, version, cached, stale, age_seconds,
--- expires_in_seconds), or nil, an error message and an error code: the sidecar's own
--- (`not_found`, `backend_unavailable`, ...) or `daemon_unreachable` when the daemon
--- could not be asked or answered something that is not its API.
---
--- opts.socket_path (default DEFAULT_SOCKET_PATH) and opts.timeout (milliseconds for
--- the whole call, default DEFAULT_TIMEOUT). A request on a pooled connection that the
--- daemon had closed meanwhile (its idle timeout, a restart) is sent again on another.
function _M.fetch(ref, opts)
  if type(ref) ~= "string" then
    return nil, "secret-sidecar: invalid_reference: the reference must be a string",
      "invalid_reference"
  end
  opts = opts or {}
  local path = opts.socket_path
  if type(path) ~= "string" then
    path = _M.DEFAULT_SOCKET_PATH
  end
  local timeout = opts.timeout
  if type(timeout) ~= "number" or timeout <= 0 then
    timeout = _M.DEFAULT_TIMEOUT
  end
  ngx.update_time()
  local deadline = ngx.now() + timeout / 1000
  local request = "GET /v1/secrets?ref=" .. escape(ref) .. " HTTP/1.1\r\n"
    .. "Host: secret-sidecar\r\nAccept: application/json\r\n"
    .. "User-Agent: " .. USER_AGENT .. "\r\n\r\n"

  -- a pooled connection that fails is dropped and the next one tried (the pool may hold
  -- several the daemon closed, e.g. on a restart); a fresh connection that fails ends it
  local status, body, close
  for _ = 1, POOL_SIZE + 1 do
    local sock, err = new_socket()
    if not sock then
      return nil, "secret-sidecar: daemon_unreachable: " .. err, UNREACHABLE
    end
    local ms = left(deadline)
    if not ms then
      return nil, fmt("secret-sidecar: daemon_unreachable: %s: timeout", path), UNREACHABLE
    end
    sock:settimeout(ms)
    local ok
    ok, err = sock:connect("unix:" .. path)
    if not ok then
      return nil, fmt("secret-sidecar: daemon_unreachable: %s: connect: %s", path, err), UNREACHABLE
    end
    local reused = (sock:getreusedtimes() or 0) > 0
    status, body, close = exchange(sock, request, deadline)
    if status then
      if close then
        sock:close()
      else
        sock:setkeepalive(KEEPALIVE_IDLE, POOL_SIZE)
      end
      break
    end
    sock:close()
    err = body
    if not reused or find(err, "timeout", 1, true) then
      return nil, fmt("secret-sidecar: daemon_unreachable: %s: %s", path, err), UNREACHABLE
    end
  end

  if not status then
    return nil, fmt("secret-sidecar: daemon_unreachable: %s: every pooled connection failed",
                    path), UNREACHABLE
  end

  local doc = cjson.decode(body)
  if type(doc) ~= "table" then
    return nil, fmt("secret-sidecar: daemon_unreachable: %s: answered %d without a JSON object",
                    path, status), UNREACHABLE
  end
  if status ~= 200 then
    local e = doc.error
    if type(e) ~= "table" or type(e.code) ~= "string" then
      return nil, fmt("secret-sidecar: daemon_unreachable: %s: answered %d without an error code",
                      path, status), UNREACHABLE
    end
    local message = type(e.message) == "string" and e.message or ""
    return nil, fmt("secret-sidecar: %s: %s", e.code, message), e.code
  end
  if type(doc.value) ~= "string" then
    return nil, fmt("secret-sidecar: daemon_unreachable: %s: answered 200 without a string value",
                    path), UNREACHABLE
  end
  if doc.stale == true then
    ngx.log(ngx.NOTICE, "secret-sidecar served a stale value for ", ref, ": its backend is ",
            "failing; the value was fetched ", tonumber(doc.age_seconds) or "?", " s ago")
  end
  return doc
end


--- The value of `ref` (a string), or nil and an error message naming the sidecar's
--- error code. `opts` as for `fetch`.
function _M.get(ref, opts)
  local answer, err = _M.fetch(ref, opts)
  if not answer then
    return nil, err
  end
  return answer.value
end


return _M
