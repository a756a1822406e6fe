-- The one apply path for remote versions (hot path and cold path alike).
-- ARGV[4] = stream maxlen, ARGV[5] = relay ('1': re-emit each applied version on this node's
-- stream, so nodes that tail only this one get it too), ARGV[6] = the greatest HLC in the batch
-- (the store clock observes it once any item applies), ARGV[7] = the items, one MessagePack
-- array (old-spec raw strings and unsigned integers only) of 17-element arrays: key, '' (the
-- leaf path is worked out here, from the key), tombstone flag, '' (the data: see ARGV[13] on),
-- content hash, hlc, origin, content type, version, updated_at,
-- trace parent, leaf digest, the leaf digest again as its four 32-bit words (the script XORs
-- words; converting here costs the server more), and the stream entry's meta JSON when
-- relaying (else ''). A cold-path item that replaces a written-off version (docs/DELETES.md,
-- "Written off") carries two more: the held version's hlc and origin. It replaces exactly that
-- version, whatever the order and this store's claims say; if the key holds anything else by
-- now, it is applied as any other item.
-- One packed argument instead of 17 per item: packing and unpacking run in C on both sides,
-- where building and parsing 17,000 separate arguments cost more than the script itself.
--
-- A tailer also says where the batch came from, so the store can record how far it has applied
-- that peer's stream and take the claims the stream proves (docs/DELETES.md, "Claims"):
-- ARGV[8] = the peer ('' for none: a cold-path batch), ARGV[9] = the peer stream's token,
-- ARGV[10] and ARGV[11] = the batch's first exclusive and last stream ids (fixed width),
-- ARGV[12] = 'c' (read on from the cursor), 'f' (read from the start of a stream that holds
-- every write its claims cover: never trimmed, in the epoch its record was created in), 'g'
-- (entries were missed before this batch) or 'n' ('c' for a batch sent while the one before it
-- was still in flight: the tailer pipelines its applies while catching up). An 'n' batch is
-- applied only if the store's anchor shows the one before it applied (same token, the anchor at
-- or past this batch's first id); otherwise nothing is read or written and the reply is
-- {'', 'x'}, and the tailer sends the batch again once the one before it is applied. So a batch
-- never lands ahead of a predecessor that failed, which would leave the anchor unset for
-- nothing but a retry.
--
-- ARGV[13] to ARGV[12 + the number of items] = each item's data (its stored payload), in item
-- order, then origin, hlc pairs to claim when the batch is applied contiguously. The data is kept
-- out of the packed items: Redis 7 hashes every byte of every string that enters Lua
-- (redis#9449, about 14 instructions a byte), and a payload inside the packed argument was
-- hashed twice, once there and once unpacked.
--
-- Returns {statuses, anchor, index, error, index, error, ...}: one status letter per item as one
-- string ('a' applied, 'd' duplicate, 's' stale, 'k' known: at or below this store's claim for
-- its origin, 'w' refused: the item's key, leaf or an ancestor holds the wrong type), whether
-- the peer's stream is anchored after this batch ('1', '0', '' without a peer, 'x' for a batch
-- sent out of its turn and not applied, see 'n' above), then the
-- refused items' positions (1-based) and Redis's message for each.
local maxlen, relay, src = ARGV[4], ARGV[5] == '1', ARGV[8]
local problem = check_store_keys({HLC_KEY, 'string', ROOT_KEY, 'string', TOMBS_KEY, 'zset',
  CDC_KEY, 'stream', REC, 'hash'})
if problem then return problem end
if ARGV[12] == 'n' then
  local cur = read_anchor(src)
  if not cur or cur.token ~= ARGV[9] or bytes_gt(ARGV[10], cur.pos) then return {'', 'x'} end
end
local items = ARGV[7] ~= '' and cmsgpack.unpack(ARGV[7]) or {}
local out, errors = {}, {}
local applied = false
for n = 1, #items do
  local it = items[n]
  local key, tomb, data, hash, hlc, origin = it[1], it[3], ARGV[12 + n], it[5], it[6], it[7]
  local path = path_of(key)
  local cur, why = read_checked(key, path)
  local status = 'a'
  if not cur then
    status = 'w'
    errors[#errors + 1], errors[#errors + 2] = n, why
  elseif it[18] and cur.hlc == it[18] and cur.origin == it[19] then
    status = 'a'
  else
    local claim = claim_of(origin)
    if claim and not hlc_gt(hlc, claim) then
      status = 'k'
    elseif cur.hlc and not newer(hlc, origin, tomb, hash, cur.hlc, cur.origin or '',
        cur.del or '0', cur.hash) then
      if cur.hash == hash and cur.del == tomb then status = 'd' else status = 's' end
    end
  end
  if status == 'a' then
    local refused = write_item(key, path, tomb, data, hash, hlc, origin, it[8], it[9], it[10],
      it[11], cur, it[12], it[13], it[14], it[15], it[16])
    if refused then
      status = 'w'
      errors[#errors + 1], errors[#errors + 2] = n, refused .. ' (key ' .. MK .. path .. ')'
    else
      applied = true
      if relay then
        emit(maxlen, key, tomb, data, hash, hlc, origin, it[8], it[9], it[10], it[11], it[17])
      end
    end
  end
  out[n] = status
end
tree_flush()
if applied then hlc_observe(ARGV[6]) end
local anchor_state = ''
if src ~= '' then
  local token, first, last, mode = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
  local cur = read_anchor(src)
  local same = cur ~= nil and cur.token == token
  local contiguous = (mode == 'c' or mode == 'n') and same and not bytes_gt(first, cur.pos)
  -- A refused item is a hole in what this store holds of the stream: unanchored, durably, so
  -- no later batch claims past it, even after a restart (claims wait for a complete repair).
  local anchored = #errors == 0 and (mode == 'f' or (contiguous and cur.anchored))
  local pos = last
  if same and bytes_gt(cur.pos, last) then pos = cur.pos end
  -- Unanchored: contiguous again from this batch's end, or from where it already was.
  local since = last
  if contiguous and not cur.anchored and cur.since ~= '' then since = cur.since end
  write_anchor(src, token, pos, anchored, since)
  if anchored then raise_claims(13 + #items) end
  anchor_state = anchored and '1' or '0'
end
local reply = {table.concat(out), anchor_state}
for i = 1, #errors do reply[i + 2] = errors[i] end
return reply
