-- Test stand-in for the config of Kong's bundled HashiCorp Vault vault (`hcv`): the
-- fields the facade tests set, with Kong's defaults, of which `kv` is "v1" (a Konnect
-- vault entity must say kv "v2" to read the facade's default). Written for
-- tests/kong/test_facade_lua.py; see ../hcv.lua (the harness's Lua path has no ?/init.lua).

return {
  name = "hcv",
  fields = {
    {
      config = {
        type = "record",
        fields = {
          { protocol = { type = "string", required = false, default = "http" } },
          { host = { type = "string", required = true, default = "127.0.0.1" } },
          { port = { type = "integer", required = true, default = 8200 } },
          { namespace = { type = "string", required = false } },
          { mount = { type = "string", required = true, default = "secret" } },
          { kv = { type = "string", required = false, default = "v1" } },
          { auth_method = { type = "string", required = false, default = "token" } },
          { token = { type = "string", required = false } },
          { kube_role = { type = "string", required = false } },
          { kube_auth_path = { type = "string", required = true, default = "kubernetes" } },
          { kube_api_token_file = { type = "string", required = false } },
          { ttl = { type = "number", required = false } },
        },
      },
    },
  },
}
