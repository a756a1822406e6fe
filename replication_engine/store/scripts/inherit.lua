-- Take a peer's claims after a complete cold-path repair from it (docs/DELETES.md, "Claims",
-- way 3): this store now holds everything the peer held when the repair began.
-- ARGV[4] = the peer, ARGV[5] = its stream's token, ARGV[6] = its stream tail (fixed width)
-- when the repair began, ARGV[7] and ARGV[8] = this store's incarnation and certification
-- count when the repair began, then origin, hlc pairs.
-- Anchors this store in the peer's stream at that tail, unless it already stands further on
-- under the same token: a tailer ahead of the repair keeps its own anchor, and one that is
-- unanchored becomes anchored where it stands if it has applied the stream contiguously since a
-- position at or before that tail (the repair covers the gap before that position).
-- Returns 2 (claims taken, anchored), 1 (claims taken, the tailer stays unanchored: a later
-- repair anchors it), or 0 (nothing done) when this store's record went back meanwhile.
local problem = check_store_keys({REC, 'hash'})
if problem then return problem end
if not record_unmoved(ARGV[7], ARGV[8]) then return 0 end
local src, token, tail = ARGV[4], ARGV[5], ARGV[6]
local cur = read_anchor(src)
local anchored = true
if not (cur and cur.token == token and bytes_gt(cur.pos, tail)) then
  write_anchor(src, token, tail, true)
elseif not cur.anchored and cur.since ~= '' and not bytes_gt(cur.since, tail) then
  write_anchor(src, token, cur.pos, true)
else
  anchored = cur.anchored
end
raise_claims(9)
return anchored and 2 or 1
