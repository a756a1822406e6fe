-- Check one parent of leaf buckets against its leaves, and its ancestors against their
-- children, rebuilding what disagrees (docs/DELETES.md: defence in depth for a tree that a
-- failure part way, or a hand edit, left inconsistent). ARGV[4] = the parent's path,
-- ARGV[5] = the fanout, ARGV[6] = '1' to rewrite what differs ('0': only count it).
-- Every node's value must be the XOR of its children's (the root: of the root map's values).
-- Returns the number of node fields (and the root) that disagreed.
local problem = check_store_keys({ROOT_KEY, 'string'})
if problem then return problem end
local parent, fanout, fix = ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1'

-- XOR of a list of 32-hex digests, as four 32-bit words.
local function xor_all(values)
  local acc = {0, 0, 0, 0}
  for i = 1, #values do
    local v = values[i]
    acc[1] = bxor(acc[1], tonum(sub(v, 1, 8), 16))
    acc[2] = bxor(acc[2], tonum(sub(v, 9, 16), 16))
    acc[3] = bxor(acc[3], tonum(sub(v, 17, 24), 16))
    acc[4] = bxor(acc[4], tonum(sub(v, 25, 32), 16))
  end
  return store_xor(nil, acc) -- 32 hex, or false at zero
end

local wrong = 0
-- Set one node's children map to `want` (child -> digest), counting what differs.
local function settle(path, want)
  local stored = call('HGETALL', MK .. path)
  local have = {}
  for i = 1, #stored, 2 do have[stored[i]] = stored[i + 1] end
  for child, digest in pairs(want) do
    if have[child] ~= digest then
      wrong = wrong + 1
      if fix then call('HSET', MK .. path, child, digest) end
    end
    have[child] = nil
  end
  for child in pairs(have) do
    wrong = wrong + 1
    if fix then call('HDEL', MK .. path, child) end
  end
end

local want = {}
for i = 0, fanout - 1 do
  local child = fmt('%0' .. W .. 'x', i)
  local digest = xor_all(call('HVALS', MK .. parent .. child))
  if digest then want[child] = digest end
end
settle(parent, want)
-- Ancestors, nearest first: each one's field for the node below is the XOR of that node.
local path = parent
while #path > 0 do
  local up = sub(path, 1, #path - W)
  local digest = xor_all(call('HVALS', MK .. path))
  local current = call('HGET', MK .. up, sub(path, #path - W + 1))
  if (digest or nil) ~= (current or nil) then
    wrong = wrong + 1
    if fix then
      if digest then
        call('HSET', MK .. up, sub(path, #path - W + 1), digest)
      else
        call('HDEL', MK .. up, sub(path, #path - W + 1))
      end
    end
  end
  path = up
end
local root = xor_all(call('HVALS', MK))
local stored_root = call('GET', ROOT_KEY)
if (root or nil) ~= (stored_root or nil) then
  wrong = wrong + 1
  if fix then
    if root then call('SET', ROOT_KEY, root) else call('DEL', ROOT_KEY) end
  end
end
return wrong
