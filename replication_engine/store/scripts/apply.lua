-- The one apply path for remote versions (hot path and cold path alike).
-- ARGV[3] = stream maxlen, ARGV[4] = tombstone horizon (ms; older tombstones for keys we do not
-- hold are already collected here and must not come back), ARGV[5] = relay ('1': re-emit each
-- applied version on this node's stream, so nodes that tail only this one get it too),
-- ARGV[6] = the greatest HLC in the batch (the store clock observes it once any item applies),
-- ARGV[7] = the items, one MessagePack array (old-spec raw strings and unsigned integers only)
-- of 17-element arrays: key, leaf path, tombstone flag, data, content hash, hlc, origin,
-- content type, version, updated_at, trace parent, leaf digest, the leaf digest again as its
-- four 32-bit words (the script XORs words; converting here costs the server more), and the
-- stream entry's meta JSON when relaying (else '').
-- One packed argument instead of 17 per item: packing and unpacking run in C on both sides,
-- where building and parsing 17,000 separate arguments cost more than the script itself.
-- Returns one status letter per item, as one string: 'a' applied, 'd' duplicate (same
-- content, not newer), 's' stale (older than what we hold), 'x' expired tombstone.
local maxlen, horizon, relay = ARGV[3], tonumber(ARGV[4]), ARGV[5] == '1'
local items = cmsgpack.unpack(ARGV[7])
local out = {}
local applied = false
for n = 1, #items do
  local it = items[n]
  local key, tomb, hash, hlc, origin = it[1], it[3], it[5], it[6], it[7]
  local cur = read_item(key)
  local status = 'a'
  if cur.hlc then
    local newer = hlc_gt(hlc, cur.hlc) or (hlc == cur.hlc and bytes_gt(origin, cur.origin or ''))
    if not newer then
      if cur.hash == hash and cur.del == tomb then status = 'd' else status = 's' end
    end
  elseif tomb == '1' and hlc_ms(hlc) < horizon then
    status = 'x'
  end
  if status == 'a' then
    applied = true
    write_item(key, it[2], tomb, it[4], hash, hlc, origin, it[8], it[9], it[10], it[11], cur,
      it[12], it[13], it[14], it[15], it[16])
    if relay then
      emit(maxlen, key, tomb, it[4], hash, hlc, origin, it[8], it[9], it[10], it[11], it[17])
    end
  end
  out[n] = status
end
tree_flush()
if applied then hlc_observe(ARGV[6]) end
return table.concat(out)
