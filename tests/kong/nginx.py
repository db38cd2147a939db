"""A real nginx with the Lua module, in a temp prefix on a loopback port, as the client of
the sidecar: the runtime Kong is built on (OpenResty's lua-nginx-module, cosockets, cjson).

``GET /kong?ref=<reference>`` resolves a Kong reference the way Kong's vault PDK does
(``tests/kong/lua/pdk_shim.lua``: parse, conf from the schema, ``get(conf, resource,
version)``, the key taken from the JSON) through ``kong.vaults.sidecar`` and answers
``{"value", "err", "ttl", "pid"}``; ``GET /openresty?ref=<reference>`` calls
``require("secret_sidecar").get(ref)`` and answers ``{"value", "err", "pid"}``.

Every nginx's error log is scanned for the canaries when it stops: no secret value may
ever reach a log line.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tests.canary import assert_clean
from tests.integration.harness import free_port

REPO = Path(__file__).resolve().parents[2]
LUA_PATH = ";".join(
    [
        f"{REPO}/deploy/kong/?.lua",
        f"{REPO}/deploy/kong/?/init.lua",
        f"{REPO}/tests/kong/lua/?.lua",
        "/usr/share/lua/5.1/?.lua",  # lua-resty-core, which lua-nginx-module loads
        ";",
    ]
)
MODULES = ("/usr/lib/nginx/modules/ndk_http_module.so",
           "/usr/lib/nginx/modules/ngx_http_lua_module.so")  # fmt: skip
START_TIMEOUT = 10.0

CONF = """\
{modules}
{user}
worker_processes {workers};
daemon off;
pid logs/nginx.pid;
error_log logs/error.log notice;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    lua_package_path "{lua_path}";
    init_by_lua_block {{
        -- loaded in the master, so workers that run as nobody need not read the tree
        require("kong.vaults.sidecar")
        require("secret_sidecar")
        require("pdk_shim").setup(require("cjson").decode([==[{setup}]==]))
        {init}
    }}
    {http}
    server {{
        listen 127.0.0.1:{port} reuseport;
        {include}
        location = /kong {{
            content_by_lua_block {{
                local value, err, ttl = require("pdk_shim").resolve(ngx.req.get_uri_args().ref)
                ngx.header.content_type = "application/json"
                ngx.say(require("cjson").encode({{
                    value = value, err = err, ttl = ttl, pid = ngx.worker.pid() }}))
            }}
        }}
        location = /init {{
            content_by_lua_block {{  -- what the init code left in INIT_RESULT
                ngx.header.content_type = "application/json"
                ngx.say(require("cjson").encode(INIT_RESULT or {{}}))
            }}
        }}
        location = /openresty {{
            content_by_lua_block {{
                local args = ngx.req.get_uri_args()
                local value, err = require("secret_sidecar").get(args.ref, {{
                    socket_path = args.socket, timeout = tonumber(args.timeout) }})
                ngx.header.content_type = "application/json"
                ngx.say(require("cjson").encode({{
                    value = value, err = err, pid = ngx.worker.pid() }}))
            }}
        }}
    }}
}}
"""


class Nginx:
    """nginx -p <prefix> in the foreground (``daemon off``), stopped with SIGQUIT."""

    def __init__(
        self,
        program: str,
        prefix: Path,
        *,
        entities: Mapping[str, Any] | None = None,
        base: Mapping[str, Any] | None = None,
        workers: int = 1,
        as_root: bool = True,
        http: str = "",
        include: Path | None = None,
        init: str = "",
    ) -> None:
        self.program = program
        self.prefix = prefix
        self.port = free_port()
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        setup = json.dumps({"entities": entities or {}, "base": {"sidecar": base or {}}})
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(
            CONF.format(
                modules="\n".join(f"load_module {m};" for m in MODULES),
                # without it the workers of a root master run as nobody
                user="user root;" if as_root else "",
                workers=workers,
                lua_path=LUA_PATH,
                setup=setup,
                port=self.port,
                init=init,  # more Lua for init_by_lua, run by the master
                http=http,  # more of the http {} block
                include=f"include {include};" if include else "",  # into the server {}
            )
        )
        self.error_log = prefix / "logs" / "error.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _argv(self, *extra: str) -> list[str]:
        return [self.program, "-p", str(self.prefix), "-c", str(self.conf),
                "-e", str(self.error_log), *extra]  # fmt: skip

    def start(self) -> Nginx:
        self.process = subprocess.Popen(self._argv(), stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise AssertionError(
                    f"nginx exited {self.process.returncode}: {err}\n{self.logs()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.01)
        raise AssertionError(f"nginx did not listen within {START_TIMEOUT} s:\n{self.logs()}")

    def stop(self) -> None:
        """Graceful stop, then the error log must hold no canary."""
        __tracebackhide__ = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        assert_clean(self.logs(), where=f"the nginx error log {self.error_log}")

    def logs(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def kong(self, ref: str, session: aiohttp.ClientSession | None = None) -> dict[str, Any]:
        """What Kong's PDK makes of ``ref`` through the sidecar vault."""
        return await self._call("/kong", {"ref": ref}, session)

    async def openresty(self, ref: str, **options: str) -> dict[str, Any]:
        """``require("secret_sidecar").get(ref, options)`` in a worker."""
        return await self._call("/openresty", {"ref": ref, **options}, None)

    async def _call(
        self, path: str, params: dict[str, str], session: aiohttp.ClientSession | None
    ) -> dict[str, Any]:
        if session is None:
            async with aiohttp.ClientSession() as own:
                return await self._call(path, params, own)
        timeout = aiohttp.ClientTimeout(total=15)
        async with session.get(self.url + path, params=params, timeout=timeout) as response:
            assert response.status == 200, await response.text()
            document: dict[str, Any] = await response.json()
            return document
