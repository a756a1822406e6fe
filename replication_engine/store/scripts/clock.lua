-- Raise the store clock to ARGV[4] (16 hex) if it is behind: restoring the HLC floor of a
-- store that lost its clock (docs/DELETES.md, "Stores that go back in time").
local problem = check_store_keys({HLC_KEY, 'string'})
if problem then return problem end
hlc_observe(ARGV[4])
return call('GET', HLC_KEY)
