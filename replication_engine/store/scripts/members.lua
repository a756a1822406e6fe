-- Add to this store's published member set and forgotten set (docs/DELETES.md, "Membership"):
-- ARGV[4] = members to add, ARGV[5] = ids to forget, each comma-separated. Lists only grow
-- here (an operator and the engine may add at the same moment), and a forgotten id leaves the
-- member set for good.
-- ARGV[6] and ARGV[7], when given, are this store's incarnation and certification count when
-- a forget barrier began, and ARGV[8...] the forgotten ids whose barrier closed: this store
-- has had a complete repair from every peer since, so it claims every write of theirs
-- (docs/DELETES.md, "Forgetting a member"), unless its record went back meanwhile.
-- Returns {members, forgotten, claimed ('1' or '0')} as stored.
local problem = check_store_keys({REC, 'hash'})
if problem then return problem end
local f = call('HMGET', REC, 'members', 'forgotten')
local function set_of(text, into)
  for id in string.gmatch(text or '', '[^,]+') do into[id] = true end
  return into
end
local forgotten = set_of(ARGV[5], set_of(f[2], {}))
local members = set_of(ARGV[4], set_of(f[1], {}))
local function render(set, skip)
  local out = {}
  for id in pairs(set) do
    if not (skip and skip[id]) then out[#out + 1] = id end
  end
  table.sort(out, function(a, b) return bytes_gt(b, a) end)
  return table.concat(out, ',')
end
local m, g = render(members, forgotten), render(forgotten)
if m ~= (f[1] or '') or g ~= (f[2] or '') then
  call('HSET', REC, 'members', m, 'forgotten', g)
end
local claimed = '0'
if ARGV[6] and ARGV[6] ~= '' and record_unmoved(ARGV[6], ARGV[7]) then
  for i = 8, #ARGV do
    if ARGV[i] ~= SELF then call('HSET', REC, 'c:' .. ARGV[i], 'ffffffffffffffff') end
  end
  claimed = '1'
end
return {m, g, claimed}
