-- Test stand-in for Kong's kong.db.schema.typedefs: only the `ttl` the sidecar vault's
-- schema uses, with Kong's definition (a number from 0 to DAO_MAX_TTL, 1e8).
return {
  ttl = { type = "number", between = { 0, 100000000 } },
}
