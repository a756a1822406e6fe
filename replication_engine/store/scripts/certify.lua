-- Certify this store's claim about its own writes (docs/DELETES.md, "Claims", way 1), or find
-- that the store may have lost writes since the last certification.
-- ARGV[4] = the Redis run_id the engine certified on last ('' when it does not know),
-- ARGV[5], ARGV[6] = the nonces the engine may have written last ('' when it does not know),
-- ARGV[7] = the new nonce, ARGV[8] = '1' to raise `self` to the store clock (only when the
-- store is trusted), ARGV[9] = a new epoch to start ('' for none), ARGV[10] = the state to
-- publish ('ok' or 'recovering'), ARGV[11] = its reason, ARGV[12] = the engine's HLC now.
-- The store clock is first raised to that HLC: any later local write gets a greater one, so
-- `self` can follow time on a node that writes nothing (collection would otherwise wait for
-- its next write).
-- Trusted means: the Redis process is the one last certified on (its run_id, read here from
-- INFO, so that no restart can slip between the check and the write) and the record holds a
-- nonce the engine wrote. Returns {'ok' | 'moved' | 'absent', run_id, recorded run_id, cert,
-- self, store clock, the server's clock in ms (TIME: the engine compares its own with it)}.
-- 'absent' writes nothing: the record must be opened first.
local problem = check_store_keys({REC, 'hash', HLC_KEY, 'string'})
if problem then return problem end
local run = string.match(call('INFO', 'server'), 'run_id:(%x+)') or ''
local f = call('HMGET', REC, 'inc', 'run', 'nonce', 'cert', 'self')
if #ARGV[12] == 16 then hlc_observe(hlc_bounded(ARGV[12])) end
local clock = call('GET', HLC_KEY) or ''
local now = fmt('%d', server_ms())
if not f[1] then return {'absent', run, '', 0, '', clock, now} end
local trusted = f[2] == run and (ARGV[4] == '' or ARGV[4] == run) and
  (ARGV[5] == '' or f[3] == ARGV[5] or f[3] == ARGV[6])
local cert = (tonumber(f[4]) or 0) + 1
local self_claim = f[5] or ''
local fields = {'HSET', REC, 'run', run, 'nonce', ARGV[7], 'cert', cert, 'state', ARGV[10],
  'reason', ARGV[11]}
if trusted and ARGV[8] == '1' then
  if clock ~= '' and (self_claim == '' or bytes_gt(clock, self_claim)) then
    self_claim = clock
    fields[#fields + 1], fields[#fields + 2] = 'self', clock
  end
  if ARGV[9] ~= '' then fields[#fields + 1], fields[#fields + 2] = 'epoch', ARGV[9] end
end
call(unpack(fields))
return {trusted and 'ok' or 'moved', run, f[2] or '', cert, self_claim, clock, now}
