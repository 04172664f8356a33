-- Decoding of the plugin server's msgpack answers, for pgwshard_host.lua.
--
-- lua-MessagePack (which Kong uses too, and the host keeps for encoding, so the server receives
-- Kong's exact bytes) decodes through a cursor object and builds a new closure for every small
-- integer, string, array or map it meets; LuaJIT cannot compile that, and on the three answers
-- of every push it was a large share of the host's CPU. This decoder reads the string in place.
--
-- decode(s) returns the one value `s` holds (decode_first: the first, and where it ends). It raises INCOMPLETE when `s` ends inside the
-- value (read more and try again), and a message for anything else that is not msgpack, for
-- ext types and for bytes after the value.

local byte, sub, ldexp, floor = string.byte, string.sub, math.ldexp, math.floor

local M = {}

M.INCOMPLETE = setmetatable({}, { __tostring = function() return "incomplete msgpack value" end })
local INCOMPLETE = M.INCOMPLETE

local value -- forward: value(s, i, n) -> v, next i

local function need(n, last)
  if last > n then error(INCOMPLETE, 0) end
end

local function uint(s, i, width, n)
  need(n, i + width - 1)
  local v = 0
  for k = i, i + width - 1 do v = v * 256 + byte(s, k) end
  return v, i + width
end

local function int(s, i, width, n)
  need(n, i + width - 1)
  local v = byte(s, i)
  if v >= 128 then v = v - 256 end -- the sign is in the first byte: exact up to 2^53, as doubles go
  for k = i + 1, i + width - 1 do v = v * 256 + byte(s, k) end
  return v, i + width
end

local function float32(s, i, n)
  need(n, i + 3)
  local b1, b2, b3, b4 = byte(s, i, i + 3)
  local sign = b1 >= 128 and -1 or 1
  local expo = (b1 % 128) * 2 + floor(b2 / 128)
  local mant = ((b2 % 128) * 256 + b3) * 256 + b4
  local v
  if expo == 0 then
    v = ldexp(mant, -149)
  elseif expo == 255 then
    v = mant == 0 and math.huge or 0 / 0
  else
    v = ldexp(mant + 8388608, expo - 150)
  end
  return sign * v, i + 4
end

local function float64(s, i, n)
  need(n, i + 7)
  local b1, b2, b3, b4, b5, b6, b7, b8 = byte(s, i, i + 7)
  local sign = b1 >= 128 and -1 or 1
  local expo = (b1 % 128) * 16 + floor(b2 / 16)
  local mant = (((((b2 % 16) * 256 + b3) * 256 + b4) * 256 + b5) * 256 + b6) * 65536 + b7 * 256 + b8
  local v
  if expo == 0 then
    v = ldexp(mant, -1074)
  elseif expo == 2047 then
    v = mant == 0 and math.huge or 0 / 0
  else
    v = ldexp(mant + 4503599627370496, expo - 1075)
  end
  return sign * v, i + 8
end

local function str(s, i, len, n)
  need(n, i + len - 1)
  return sub(s, i, i + len - 1), i + len
end

local function array(s, i, len, n)
  local t = {}
  for k = 1, len do
    t[k], i = value(s, i, n)
  end
  return t, i
end

local function map(s, i, len, n)
  local t = {}
  local k, v
  for _ = 1, len do
    k, i = value(s, i, n)
    v, i = value(s, i, n)
    if k ~= nil and k == k then t[k] = v end -- a nil or NaN key cannot index a Lua table
  end
  return t, i
end

value = function(s, i, n)
  need(n, i)
  local b = byte(s, i)
  i = i + 1
  if b < 0x80 then return b, i end                      -- positive fixint
  if b >= 0xe0 then return b - 0x100, i end             -- negative fixint
  if b >= 0xa0 and b < 0xc0 then return str(s, i, b - 0xa0, n) end
  if b < 0x90 then return map(s, i, b - 0x80, n) end
  if b < 0xa0 then return array(s, i, b - 0x90, n) end
  if b == 0xc0 then return nil, i end
  if b == 0xc2 then return false, i end
  if b == 0xc3 then return true, i end
  if b == 0xcc then return uint(s, i, 1, n) end
  if b == 0xcd then return uint(s, i, 2, n) end
  if b == 0xce then return uint(s, i, 4, n) end
  if b == 0xcf then return uint(s, i, 8, n) end
  if b == 0xd0 then return int(s, i, 1, n) end
  if b == 0xd1 then return int(s, i, 2, n) end
  if b == 0xd2 then return int(s, i, 4, n) end
  if b == 0xd3 then return int(s, i, 8, n) end
  if b == 0xca then return float32(s, i, n) end
  if b == 0xcb then return float64(s, i, n) end
  local len
  if b == 0xd9 or b == 0xc4 then len, i = uint(s, i, 1, n) return str(s, i, len, n) end
  if b == 0xda or b == 0xc5 then len, i = uint(s, i, 2, n) return str(s, i, len, n) end
  if b == 0xdb or b == 0xc6 then len, i = uint(s, i, 4, n) return str(s, i, len, n) end
  if b == 0xdc then len, i = uint(s, i, 2, n) return array(s, i, len, n) end
  if b == 0xdd then len, i = uint(s, i, 4, n) return array(s, i, len, n) end
  if b == 0xde then len, i = uint(s, i, 2, n) return map(s, i, len, n) end
  if b == 0xdf then len, i = uint(s, i, 4, n) return map(s, i, len, n) end
  error(string.format("msgpack type 0x%02x is not supported", b), 0) -- ext types, 0xc1
end

-- decode_first(s): the first value `s` holds and the index after it (bytes may follow).
function M.decode_first(s)
  return value(s, 1, #s)
end

function M.decode(s)
  local v, i = M.decode_first(s)
  if i <= #s then error("extra bytes after a msgpack value", 0) end
  return v
end

return M
