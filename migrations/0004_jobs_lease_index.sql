-- The scheduler asks for the earliest lease end among claimed jobs on every pass.
CREATE INDEX jobs_leased ON jobs (lease_until) WHERE lease_until IS NOT NULL;
