-- pgwshard_host: run the pgwshard plugin under plain nginx + Lua, speaking Kong's plugin-server
-- protocol as Kong 3.9.3 does (kong/runloop/plugin_servers/rpc/mp_rpc.lua, plugin.lua): the same
-- framing, encoder, calls and failure handling. Known differences: get_headers/get_query are
-- answered by a plain Step with nginx's table, where Kong sends plugin.StepMultiMap with every
-- value in a list (mp_rpc.lua fix_mmap); StartInstance sends the config file as written, where
-- Kong sends the entity's config with defaults filled and its own keys (__seq__, ...) added.
--   * msgpack RPC over the unix socket: [0, msgid, method, {args}] -> [1, msgid, error, result];
--   * plugin.StartInstance {Name, Config = <json>} once per worker (and again, with a
--     CloseInstance of the old one, when the plugin config changes);
--   * per request plugin.HandleEvent {InstanceId, EventName = "access"}, then one plugin.Step
--     {EventId, Data} per PDK call (Data absent for a nil result or an unknown method;
--     plugin.StepError for a call answering nil, err) until the answer is "ret" or a terminal
--     call (kong.response.exit/error);
--   * every RPC takes its own connection from the cosocket keepalive pool, so a Step may travel
--     on another connection than its HandleEvent;
--   * "no plugin instance" forgets the instance, starts it again and retries.
-- When the plugin server fails, it answers as Kong does (see `fail` below), or 503 with
-- fail_fast; never a hang beyond its socket timeouts.

local mp = require "MessagePack"
local decoder = require "pgwshard_msgpack"
local cjson = require "cjson.safe"
local balancer = require "ngx.balancer"

local M = {}

local settings      -- the host config (JSON file), see kong/openresty/README.md
local config_text   -- the plugin config as last read, to notice changes
local instance_id   -- this worker's plugin instance
local retired_id    -- an instance of an old config whose successor failed to start: closed later
local generation = 0  -- counts instance starts, to tell whether another request restarted it
local starting = false
local msgid = 0
local rr = 0        -- round robin over `upstream` (hash_on = "none")
local continuum     -- hash_on = "path": sorted points on the ring of `upstream`

local TERMINAL = { ["kong.response.exit"] = true, ["kong.response.error"] = true }

-- How a call to the plugin server failed; `fail` decides what the request gets.
local NO_ANSWER = "no answer"   -- refused, closed or timed out before a byte (Kong: "no data")
local ERROR = "error"           -- the server answered with an RPC error
local MALFORMED = "malformed"   -- a truncated answer, not msgpack, or not the answer to this call
local NO_START = "no start"     -- StartInstance failed

-- kong/runloop/plugin_servers/plugin.lua, get_instance_id: a request meeting another one's
-- StartInstance waits for it up to 10 s, then gives up on the plugin for this request.
local START_WAIT_SECONDS = 10
local START_WAIT_STEP = 0.1 -- plugin.lua get_instance_id: SLEEP_STEP, up to WAIT_TIME (10 s)
-- Kong retries "no plugin instance" without limit (mp_rpc.lua, Rpc:handle_event calls itself).
-- A server that forgets every instance it starts would loop a request through StartInstance
-- forever; three rounds cover a restart racing other requests, then it counts as a failure.
local INSTANCE_ROUNDS = 3

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  return text
end

-- One RPC on one pooled connection: result, or nil, err, how (above), stale.
local function rpc_once(method, arg)
  local sock = ngx.socket.tcp()
  sock:settimeouts(settings.connect_timeout_ms, settings.send_timeout_ms, settings.read_timeout_ms)
  local ok, err = sock:connect("unix:" .. settings.socket)
  if not ok then
    return nil, "plugin server unreachable: " .. err, NO_ANSWER
  end
  local reused = sock:getreusedtimes() > 0
  msgid = msgid + 1
  local id = msgid
  ok, err = sock:send(mp.pack({ 0, id, method, { arg } }))
  if not ok then
    sock:close()
    return nil, "plugin server write failed: " .. err, NO_ANSWER, reused
  end
  -- An answer is a few hundred bytes and nearly always arrives in one read.
  local data, read_err = sock:receiveany(65536)
  if not data then
    sock:close()
    -- closed without a byte of answer on a pooled connection: the server restarted since
    local stale = reused and read_err == "closed"
    return nil, "plugin server read failed: " .. tostring(read_err), NO_ANSWER, stale
  end
  -- Kong's reader (mp_rpc.lua, Rpc:call) reads messages until the answer: a notification
  -- [2, label, args] before it is handled and passed over; bytes after the answer are dropped.
  local message
  while data do
    local decoded, value, next_i = false, decoder.INCOMPLETE, nil
    if #data > 0 then
      decoded, value, next_i = pcall(decoder.decode_first, data)
    end
    if decoded and type(value) == "table" and value[1] == 2 then
      ngx.log(ngx.INFO, "pgwshard host: plugin server notification ", tostring(value[2]))
      data = data:sub(next_i)
    elseif decoded then
      message = value
      break
    elseif value ~= decoder.INCOMPLETE then
      read_err = value
      break
    else
      local more
      more, read_err = sock:receiveany(65536)
      if not more and #data == 0 then
        -- nothing of an answer yet (a notification, then silence): Kong's reader calls this
        -- "no data" (its unpacker protects a read at a message boundary)
        sock:close()
        return nil, "plugin server read failed: " .. tostring(read_err), NO_ANSWER
      end
      data = more and data .. more
    end
  end
  -- Kong's reader (mp_rpc.lua, Rpc:call) raises on a truncated or undecodable answer and
  -- asserts that it is the response to this call: all three escape the plugin as errors.
  if type(message) ~= "table" then
    sock:close()
    return nil, "plugin server sent no RPC answer: " .. tostring(read_err or "not an array"), MALFORMED
  end
  sock:setkeepalive(settings.keepalive_ms, settings.keepalive_pool)
  if message[1] ~= 1 or message[2] ~= id then
    return nil, "plugin server answered " .. tostring(message[1]) .. "/" .. tostring(message[2])
      .. " to message " .. id, MALFORMED
  end
  if message[3] ~= nil then
    return nil, tostring(message[3]), ERROR
  end
  return message[4]
end

-- A pooled connection may have been closed by a plugin server that restarted since: such a
-- connection fails at once, before the server saw the call, so a retry on a fresh one is safe.
local function rpc(method, arg)
  for _ = 1, settings.keepalive_pool + 1 do
    local res, err, how, stale = rpc_once(method, arg)
    if not stale then
      return res, err, how
    end
  end
  return nil, "plugin server connections keep failing", NO_ANSWER
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
    return nil, "starting instance: " .. rpc_err
  end
  local old = close_old and instance_id or retired_id
  instance_id, config_text, generation, retired_id = res.Id, text, generation + 1, nil
  ngx.log(ngx.NOTICE, "pgwshard host: started instance ", instance_id, " of ", settings.plugin)
  if old and old ~= instance_id then
    rpc("plugin.CloseInstance", old)
  end
  return instance_id
end

-- One start at a time per worker, as Kong does: requests arriving meanwhile (a burst after a
-- plugin server restart all meet "no plugin instance") wait for it instead of each starting an
-- instance that nobody would ever close. Returns the id, or nil, err, how.
local function start_instance(close_old)
  local waited = 0
  while starting do
    if waited >= START_WAIT_SECONDS then
      return nil, "could not claim the instance id of " .. settings.plugin, NO_ANSWER
    end
    ngx.sleep(START_WAIT_STEP)
    waited = waited + START_WAIT_STEP
  end
  if waited > 0 and instance_id then
    return instance_id
  end
  -- nobody else is starting it (or that start failed: then this request tries, as Kong's do)
  starting = true
  local ok, id, err = pcall(start_instance_now, close_old)
  starting = false
  if not ok or not id then
    return nil, tostring(ok and err or id), NO_START
  end
  return id
end

-- plugin.HandleEvent for this request, starting this worker's instance first if it has none.
local function handle_event()
  for _ = 1, INSTANCE_ROUNDS do
    if not instance_id then
      local _, err, how = start_instance()
      if err then return nil, err, how end
    end
    local seen = generation
    local answer, err, how = rpc("plugin.HandleEvent", { InstanceId = instance_id, EventName = "access" })
    if answer or how ~= ERROR or not err:lower():find("no plugin instance", 1, true) then
      return answer, err, how
    end
    -- the server restarted: forget the instance (Kong: reset_instance) unless another request
    -- of this worker has started a new one meanwhile
    ngx.log(ngx.WARN, "pgwshard host: ", err)
    if generation == seen then instance_id = nil end
    retired_id = nil -- the server that knew it is gone: a new one may hand the id out again
  end
  return nil, "the plugin server keeps answering \"no plugin instance\"", NO_ANSWER
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

-- What a request gets when its call to the plugin server failed: what Kong 3.9.3 does, unless
-- the host is told to fail fast.
--  * fail_fast: 503, whatever failed.
--  * HandleEvent or a Step got no answer or an RPC error: Kong logs it and the request goes on
--    (mp_rpc.lua, Rpc:handle_event), to the route's own upstream balancing, or to a target the
--    plugin set before the failure.
--  * StartInstance failed (plugin.lua, get_instance_id raises), or the answer was malformed
--    (mp_rpc.lua raises or asserts): the error escapes the plugin's handler, and Kong answers 500
--    with its generic body (kong/init.lua, execute_collecting_plugins_iterator).
local function fail(err, how)
  if settings.fail_fast then
    ngx.log(ngx.ERR, "pgwshard host: ", err)
    return exit(503, { message = "pgwshard: the plugin server is unavailable" })
  end
  if how == NO_ANSWER or how == ERROR then
    ngx.log(ngx.ERR, "pgwshard host: ", err, " (the request goes on without the plugin)")
    return
  end
  ngx.log(ngx.ERR, "pgwshard host: ", err)
  return exit(500, { message = "An unexpected error occurred" })
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
-- Kong's checks (kong/pdk/service.lua, set_target): an error escapes to the access handler, 500
pdk["kong.service.set_target"] = function(host, port)
  if type(host) ~= "string" then
    error("host must be a string")
  end
  if type(port) ~= "number" or math.floor(port) ~= port then
    error("port must be an integer")
  end
  if port < 0 or port > 65535 then
    error("port must be an integer between 0 and 65535: given " .. port)
  end
  ngx.ctx.pgwshard_target = { host, port }
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

function M.access()
  local answer, err, how = handle_event()
  for _ = 1, 100 do -- a plugin making more PDK calls than this is broken
    if not answer then return fail(err, how) end
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
    local step_method = "plugin.Step"
    if not fn then
      -- Kong (mp_rpc.lua, call_pdk_method): logged, and answered by a Step without Data
      ngx.log(ngx.ERR, "pgwshard host: could not find pdk method: ", tostring(method))
    else
      local call_ok, result, call_err = pcall(fn, unpack(args))
      if not call_ok then
        -- Kong calls the PDK unprotected: the error escapes the plugin's handler, 500
        ngx.log(ngx.ERR, "pgwshard host: ", tostring(method), " failed: ", tostring(result))
        return exit(500, { message = "An unexpected error occurred" })
      end
      if result == nil and call_err ~= nil then
        step_method, result = "plugin.StepError", tostring(call_err) -- mp_rpc.lua, get_step_method
      end
      step.Data = result -- nil leaves Data out, as Kong does
    end
    answer, err, how = rpc(step_method, step)
  end
  return fail("the plugin made too many PDK calls", NO_ANSWER)
end

-- hash_on = "path": Kong's upstream with `hash_on: path` (kong/runloop/balancer/init.lua hashes
-- ngx.var.uri, the normalised path) on a consistent-hashing ring of 160 points per target
-- (balancer/consistent_hashing.lua, xxhash32). Here MD5's first 32 bits, which nginx has at hand:
-- the same properties (one target per path, ~1/N of the paths move when a target comes or goes),
-- not Kong's exact ring. Not crc32: it is affine, so the points of two targets whose names differ
-- in a few characters are one XOR apart, and for some pairs of ports one target took nearly
-- every arc (all 12 paths of a test on one of three targets).
local POINTS_PER_TARGET = 160

local function hash32(value)
  local b1, b2, b3, b4 = string.byte(ngx.md5_bin(value), 1, 4)
  return ((b1 * 256 + b2) * 256 + b3) * 256 + b4
end

local function build_continuum(upstream)
  local points = {}
  for _, target in ipairs(upstream) do
    local name = target[1] .. ":" .. target[2]
    for i = 1, POINTS_PER_TARGET do
      points[#points + 1] = { hash32(name .. " " .. i), name, i, target }
    end
  end
  table.sort(points, function(x, y) -- every worker builds the same ring
    if x[1] ~= y[1] then return x[1] < y[1] end
    if x[2] ~= y[2] then return x[2] < y[2] end
    return x[3] < y[3]
  end)
  return points
end

local function hashed_target(value)
  local h = hash32(value)
  local lo, hi = 1, #continuum
  if h > continuum[hi][1] then return continuum[1][4] end -- wraps around
  while lo < hi do -- the first point at or after h
    local mid = math.floor((lo + hi) / 2)
    if continuum[mid][1] < h then lo = mid + 1 else hi = mid end
  end
  return continuum[lo][4]
end

-- The peer: the plugin's set_target, else the upstream's own balancing (requests the plugin
-- leaves alone, and in Kong's way requests whose plugin-server call failed).
function M.balancer()
  local target = ngx.ctx.pgwshard_target
  if not target then
    local upstream = settings.upstream
    if #upstream == 0 then return ngx.exit(502) end
    if continuum then
      target = hashed_target(ngx.var.uri)
    else
      rr = rr % #upstream + 1
      target = upstream[rr]
    end
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
  if premature or starting then return end -- a start in progress: the next tick looks again
  local text = read_file(settings.plugin_config_file)
  -- a file being rewritten in place may be read half-written: only a whole JSON document is a
  -- new config (Kong's configs arrive whole, through its Admin API or /config)
  if text and config_text and text ~= config_text and pcall(cjson.decode, text) then
    local _, err = start_instance(true) -- a new instance, then CloseInstance of the old, as Kong does
    if err and instance_id then
      -- Kong no longer uses the old instance once the config changed (plugin.lua,
      -- get_instance_id: a new __seq__ starts one on every request, and a failed start raises):
      -- requests get 500 until a config the plugin accepts is in place; the old one is closed then
      ngx.log(ngx.ERR, "pgwshard host: the new plugin config failed to start: ", err)
      retired_id, instance_id = instance_id, nil
    end
  end
end

-- init_worker_by_lua: host_config_file is a JSON file; kong/openresty/README.md lists its keys.
-- The socket timeouts default to nginx's lua_socket_* defaults (60 s), which are Kong's: its
-- calls to the plugin server set none of their own (mp_rpc.lua, Rpc:call).
function M.init_worker(host_config_file)
  local text = assert(read_file(host_config_file))
  settings = assert(cjson.decode(text), "host config is not JSON: " .. host_config_file)
  settings.plugin = settings.plugin or "pgwshard"
  settings.connect_timeout_ms = settings.connect_timeout_ms or 60000
  settings.send_timeout_ms = settings.send_timeout_ms or 60000
  settings.read_timeout_ms = settings.read_timeout_ms or 60000
  settings.keepalive_ms = settings.keepalive_ms or 60000
  settings.keepalive_pool = settings.keepalive_pool or 64
  settings.fail_fast = settings.fail_fast or false
  settings.hash_on = settings.hash_on or "path"
  assert(type(settings.fail_fast) == "boolean",
    host_config_file .. ": fail_fast must be true or false, not " .. tostring(settings.fail_fast))
  assert(settings.hash_on == "path" or settings.hash_on == "none",
    host_config_file .. ": hash_on must be \"path\" or \"none\", not " .. tostring(settings.hash_on))
  local upstream = {}
  for i, hostport in ipairs(settings.upstream or {}) do
    local host, port = hostport:match("^(.+):(%d+)$")
    assert(host, host_config_file .. ": upstream entries are \"ip:port\", not " .. tostring(hostport))
    upstream[i] = { host, tonumber(port) }
  end
  settings.upstream = upstream
  if settings.hash_on == "path" and #upstream > 0 then
    continuum = build_continuum(upstream)
  end
  ngx.timer.every(settings.config_check_interval or 1, watch_config)
end

return M
