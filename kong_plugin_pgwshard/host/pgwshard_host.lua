-- pgwshard_host: run the pgwshard plugin under plain nginx + Lua, speaking Kong's plugin-server
-- protocol exactly as Kong does (kong/runloop/plugin_servers), so the unchanged plugin server
-- cannot tell the difference:
--   * msgpack RPC over the unix socket: [0, msgid, method, {args}] -> [1, msgid, error, result];
--   * plugin.StartInstance {Name, Config = <json>} once per worker (and again, with a
--     CloseInstance of the old one, when the plugin config changes);
--   * per request plugin.HandleEvent {InstanceId, EventName = "access"}, then one plugin.Step
--     {EventId, Data} per PDK call (Data absent for a nil result; plugin.StepError when the call
--     fails) until the answer is "ret" or a terminal call (kong.response.exit/error);
--   * every RPC takes its own connection from the cosocket keepalive pool, so a Step may travel
--     on another connection than its HandleEvent;
--   * an error containing "no plugin instance" starts the instance again and retries once.
-- A dead or hung plugin server is answered 503 with a JSON body, never a hang.

local mp = require "MessagePack"
local decoder = require "pgwshard_msgpack"
local cjson = require "cjson.safe"
local balancer = require "ngx.balancer"

local M = {}

local settings      -- the host config (JSON file), see kong/openresty/README.md
local config_text   -- the plugin config as last read, to notice changes
local instance_id   -- this worker's plugin instance
local generation = 0  -- counts instance starts, to tell whether another request restarted it
local starting = false
local msgid = 0
local rr = 0        -- round robin over `upstream` for requests the plugin leaves alone

local TERMINAL = { ["kong.response.exit"] = true, ["kong.response.error"] = true }

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  return text
end

-- one RPC on one pooled connection
local function rpc_once(method, arg)
  local sock = ngx.socket.tcp()
  sock:settimeouts(settings.connect_timeout_ms, settings.send_timeout_ms, settings.read_timeout_ms)
  local ok, err = sock:connect("unix:" .. settings.socket)
  if not ok then
    return nil, "plugin server unreachable: " .. err, true
  end
  local reused = sock:getreusedtimes() > 0
  msgid = msgid + 1
  local id = msgid
  ok, err = sock:send(mp.pack({ 0, id, method, { arg } }))
  if not ok then
    sock:close()
    return nil, "plugin server write failed: " .. err, true, reused
  end
  -- An answer is a few hundred bytes and nearly always arrives in one read.
  local data, read_err = sock:receiveany(65536)
  local stale = reused and read_err == "closed" -- closed without a byte of answer
  local message
  while data do
    local decoded, value = pcall(decoder.decode, data)
    if decoded then
      message = value
      break
    elseif value ~= decoder.INCOMPLETE then
      read_err = value
      break
    end
    local more
    more, read_err = sock:receiveany(65536)
    data = more and data .. more
  end
  if type(message) ~= "table" then
    sock:close()
    return nil, "plugin server read failed: " .. tostring(read_err or "not an RPC answer"), true, stale
  end
  sock:setkeepalive(settings.keepalive_ms, settings.keepalive_pool)
  if message[2] ~= id then
    return nil, "plugin server answered message " .. tostring(message[2]) .. " to " .. id
  end
  if message[3] ~= nil then
    return nil, tostring(message[3])
  end
  return message[4]
end

-- A pooled connection may have been closed by a plugin server that restarted since: such a
-- connection fails at once, before the server saw the call, so one retry on a fresh one is safe.
local function rpc(method, arg)
  for _ = 1, settings.keepalive_pool + 1 do
    local res, err, transport, stale = rpc_once(method, arg)
    if not stale then
      return res, err, transport
    end
  end
  return nil, "plugin server connections keep failing", true
end

-- close_old: the config changed and the old instance is still there (after "no plugin
-- instance" it is gone, and a restarted server may even reuse its id for the new one).
local function start_instance_now(close_old)
  local text, err = read_file(settings.plugin_config_file)
  if not text then
    return nil, "cannot read the plugin config: " .. err
  end
  local res, rpc_err = rpc("plugin.StartInstance", { Name = settings.plugin, Config = text })
  if not res then
    return nil, rpc_err
  end
  local old = instance_id
  instance_id, config_text, generation = res.Id, text, generation + 1
  ngx.log(ngx.NOTICE, "pgwshard host: started instance ", instance_id, " of ", settings.plugin)
  if close_old and old and old ~= instance_id then
    rpc("plugin.CloseInstance", old)
  end
  return instance_id
end

-- One start at a time per worker, as Kong does: requests arriving meanwhile (a burst after a
-- plugin server restart all meet "no plugin instance") wait for it instead of each starting an
-- instance that nobody would ever close.
local function start_instance(close_old)
  if starting then
    local waits = math.ceil((settings.connect_timeout_ms + settings.read_timeout_ms) / 10) + 1
    for _ = 1, waits do
      ngx.sleep(0.01)
      if not starting then break end
    end
    if starting or not instance_id then
      return nil, "the plugin instance is still starting"
    end
    return instance_id
  end
  starting = true
  local ok, id, err = pcall(start_instance_now, close_old)
  starting = false
  if not ok then return nil, tostring(id) end
  return id, err
end

-- The PDK calls the host answers, as Kong's PDK would in the access phase.
local pdk = {}

pdk["kong.request.get_raw_path"] = function()
  local uri = ngx.var.request_uri
  local q = uri:find("?", 1, true)
  return q and uri:sub(1, q - 1) or uri
end
pdk["kong.request.get_path"] = function() return ngx.var.uri end
pdk["kong.request.get_method"] = function() return ngx.req.get_method() end
pdk["kong.request.get_header"] = function(name)
  local v = ngx.req.get_headers()[name]
  if type(v) == "table" then v = v[1] end
  return v
end
pdk["kong.request.get_headers"] = function() return ngx.req.get_headers() end
pdk["kong.request.get_query"] = function() return ngx.req.get_uri_args() end
pdk["kong.request.get_scheme"] = function() return ngx.var.scheme end
pdk["kong.request.get_host"] = function() return ngx.var.host end
pdk["kong.nginx.get_subsystem"] = function() return "http" end
pdk["kong.service.set_target"] = function(host, port)
  if type(host) ~= "string" or type(port) ~= "number" then
    error("set_target expects (host, port), got (" .. tostring(host) .. ", " .. tostring(port) .. ")")
  end
  ngx.ctx.pgwshard_target = { host, port }
end

local function exit(status, body, headers)
  for name, value in pairs(headers or {}) do ngx.header[name] = value end
  if type(body) == "table" then
    ngx.header["Content-Type"] = "application/json; charset=utf-8"
    body = cjson.encode(body)
  end
  ngx.status = status
  if body then ngx.print(body) end
  return ngx.exit(status)
end

-- Like Kong's kong.log.*: every argument through tostring, joined without a separator (as
-- ngx.log does), so a plugin logging a number or a boolean gets a line, not a StepError.
for _, level in ipairs({ "err", "warn", "notice", "info", "debug", "crit", "alert", "emerg" }) do
  local ngx_level = ngx[level == "err" and "ERR" or level:upper()]
  pdk["kong.log." .. level] = function(...)
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
    ngx.log(ngx_level, "[pgwshard] ", table.concat(parts))
  end
end

local function unavailable(reason)
  ngx.log(ngx.ERR, "pgwshard host: ", reason)
  return exit(503, { message = "pgwshard: the plugin server is unavailable" })
end

local function handle_event()
  local seen = generation
  local answer, err, transport = rpc("plugin.HandleEvent", { InstanceId = instance_id, EventName = "access" })
  if not answer and not transport and err:find("no plugin instance", 1, true) then
    if generation == seen then -- else another request of this worker already started it again
      local _, start_err = start_instance()
      if start_err then return nil, start_err, true end
    end
    answer, err, transport = rpc("plugin.HandleEvent", { InstanceId = instance_id, EventName = "access" })
  end
  return answer, err, transport
end

function M.access()
  if not instance_id then
    local _, err = start_instance()
    if err then return unavailable(err) end
  end
  local answer, err = handle_event()
  for _ = 1, 100 do -- a plugin making more PDK calls than this is broken
    if not answer then return unavailable(err) end
    local data = answer.Data
    if data == "ret" then return end
    local method, args = data.Method, data.Args or {}
    if TERMINAL[method] then
      if method == "kong.response.error" then
        return exit(args[1], { message = args[2] or "An unexpected error occurred" }, args[3])
      end
      return exit(args[1], args[2], args[3])
    end
    local step = { EventId = answer.EventId }
    local fn = pdk[method]
    local call_ok, result
    if fn then
      call_ok, result = pcall(fn, unpack(args))
    else
      call_ok, result = false, "PDK method " .. tostring(method) .. " is not supported by the pgwshard host"
    end
    if call_ok then
      step.Data = result -- nil leaves Data out, as Kong does
      answer, err = rpc("plugin.Step", step)
    else
      step.Data = tostring(result)
      answer, err = rpc("plugin.StepError", step)
    end
  end
  return unavailable("plugin made too many PDK calls")
end

function M.balancer()
  local target = ngx.ctx.pgwshard_target
  if not target then
    local upstream = settings.upstream
    if #upstream == 0 then return ngx.exit(502) end
    rr = rr % #upstream + 1
    target = upstream[rr]
  end
  local host = target[1]
  -- set_target takes an IPv6 host bare, as Kong's does; Kong's DNS client hands nginx IPv6
  -- addresses in brackets (kong/dns/utils.lua ipv6_bracket), which set_current_peer needs
  if host:find(":", 1, true) and host:sub(1, 1) ~= "[" then host = "[" .. host .. "]" end
  local ok, err = balancer.set_current_peer(host, target[2])
  if not ok then
    ngx.log(ngx.ERR, "pgwshard host: cannot use ", target[1], ":", target[2], ": ", err)
    return ngx.exit(502)
  end
end

local function watch_config(premature)
  if premature then return end
  local text = read_file(settings.plugin_config_file)
  if text and config_text and text ~= config_text then
    local _, err = start_instance(true) -- a new instance, then CloseInstance of the old, as Kong does
    if err then ngx.log(ngx.ERR, "pgwshard host: restarting the instance failed: ", err) end
  end
end

-- init_worker_by_lua: host_config_file is a JSON file:
-- {"socket": ..., "plugin": "pgwshard", "plugin_config_file": ..., "upstream": ["ip:port", ...],
--  "connect_timeout_ms", "send_timeout_ms", "read_timeout_ms", "keepalive_ms", "keepalive_pool",
--  "config_check_interval"}
function M.init_worker(host_config_file)
  local text = assert(read_file(host_config_file))
  settings = assert(cjson.decode(text), "host config is not JSON: " .. host_config_file)
  settings.plugin = settings.plugin or "pgwshard"
  settings.connect_timeout_ms = settings.connect_timeout_ms or 1000
  settings.send_timeout_ms = settings.send_timeout_ms or 2000
  settings.read_timeout_ms = settings.read_timeout_ms or 5000
  settings.keepalive_ms = settings.keepalive_ms or 60000
  settings.keepalive_pool = settings.keepalive_pool or 64
  local upstream = {}
  for i, hostport in ipairs(settings.upstream or {}) do
    local host, port = hostport:match("^(.+):(%d+)$")
    upstream[i] = { host, tonumber(port) }
  end
  settings.upstream = upstream
  ngx.timer.every(settings.config_check_interval or 1, watch_config)
end

return M
