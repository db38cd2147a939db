-- The config of the `sidecar` vault: where the secret-sidecar socket is, how long
-- to wait for it, which sidecar vault a Kong vault entity stands for, and Kong's
-- cache timings. Fields with a default are `required` so that Kong fills them in
-- for `{vault://sidecar/...}` used without a vault entity (Kong's base config for a
-- vault used by name keeps only required fields' defaults).

local typedefs = require "kong.db.schema.typedefs"

return {
  name = "sidecar",
  fields = {
    {
      config = {
        type = "record",
        fields = {
          { socket_path = {
              type = "string", required = true,
              default = "/var/run/secret-sidecar/sidecar.sock",
              match = [[^/]],
              description = "Absolute path of the secret-sidecar Unix socket.",
          } },
          { timeout = {
              type = "integer", required = true, default = 2000, between = { 1, 60000 },
              description = "Milliseconds for one request to the sidecar, connect to last byte.",
          } },
          -- the sidecar's vault prefix (or backend name); same rule as a Kong vault prefix
          { vault = {
              type = "string", required = false, match = [[^[a-z][a-z%d-]-[a-z%d]+$]],
              description = "Sidecar vault that a reference's secret id is read from; unset: "
                .. "the first segment of the secret id names it.",
          } },
          -- Kong's own cache timings; the ttl the sidecar reports overrides `ttl`
          { ttl = typedefs.ttl },
          { neg_ttl = typedefs.ttl },
          { resurrect_ttl = typedefs.ttl },
        },
      },
    },
  },
}
