"""The MCP server (`procpool mcp`), driven in a real server process by the MCP SDK's own client.

Handlers the servers allow: ``echo`` (built-in), ``fmt`` = ``str.format`` (the prompt is a format
string filled from the context: succeeds or fails depending on the data alone), ``command``
(built-in, for a task that outlives its timeout) and ``say`` = ``print`` (writes to stdout from a
worker, to show that nothing but protocol reaches the real stdout).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp_types.version import LATEST_HANDSHAKE_VERSION

import procpool
from procpool.mcp_server import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_POOLS,
    DEFAULT_MAX_PROMPT_BYTES,
    DEFAULT_MAX_TIMEOUT,
    ServerConfig,
    mcp_command,
)

pytestmark = pytest.mark.anyio

SERVER = [sys.executable, "-m", "procpool", "mcp"]
# The installed console script, which (unlike python -m) does not put the working directory on sys.path.
SCRIPT = Path(sys.executable).with_name("procpool")
HANDLERS = ["--handler", "echo", "--handler", "fmt=builtins:str.format", "--handler", "command"]
# Small limits, so that breaking them is cheap.
LIMITS = ["--max-batch", "8", "--max-prompt-bytes", "4096", "--max-timeout", "30"]
TOOLS = {
    "create_pool",
    "execute_on_pool",
    "execute_batch_on_pool",
    "route_to_pool",
    "list_pools",
    "get_pool_status",
    "check_pool_health",
    "delete_pool",
    "get_pool_manager_status",
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def stdio(*flags: str) -> StdioServerParameters:
    return StdioServerParameters(command=SERVER[0], args=[*SERVER[1:], *flags])


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """Call a tool that must succeed; return its structured result."""
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def refused(client: Client, tool: str, **args: Any) -> str:
    """Call a tool that must fail; return its one-line error message."""
    result = await client.call_tool(tool, args)
    assert result.is_error, result.structured_content
    text = result.content[0].text
    assert "\n" not in text, text
    return text


def worker_pids(status: dict[str, Any]) -> list[int]:
    return [w["pid"] for w in status["workers"] if w["pid"] is not None]


def wait_exited(pids: list[int], timeout: float = 20.0) -> None:
    """Wait until every pid has exited; a zombie (exited, not yet reaped by init) counts."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes left behind: {alive}"
        time.sleep(0.02)


def stopped_in_order(log: str, pools: int) -> bool:
    """The server logged (at info) that its lifespan shut all its pools down: the evidence that
    they were stopped in order, not just killed by their lifeline when the server died."""
    return f"pool manager stopped: {pools} of {pools} pools shut down" in log


def server_process(before: set[int]) -> psutil.Process:
    """The procpool MCP server this test started: a child of the test process that is new."""
    found = [p for p in psutil.Process().children() if p.pid not in before and "mcp" in p.cmdline()]
    assert len(found) == 1, found
    return found[0]


# -- one server for most tests -----------------------------------------------------------------


@pytest.fixture(scope="module")
async def client():
    """One stdio server for the module, with two pools: ``a`` (echo) and ``b`` (fmt)."""
    async with Client(stdio(*HANDLERS, *LIMITS)) as c:
        await call(c, "create_pool", pool_id="a", handler="echo")
        await call(c, "create_pool", pool_id="b", handler="fmt")
        yield c


async def test_every_tool_is_listed_with_a_description_and_typed_schemas(client):
    """The nine tools are listed, each with a description, a typed input schema and an output schema."""
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description, tool.name
        assert tool.input_schema["type"] == "object"
        assert tool.output_schema is not None and tool.output_schema["type"] == "object", tool.name
    execute = tools["execute_on_pool"].input_schema
    assert execute["required"] == ["pool_id", "prompt"]
    assert execute["properties"]["prompt"]["type"] == "string"
    assert execute["properties"]["timeout"]["maximum"] == 30
    batch = tools["execute_batch_on_pool"].input_schema["properties"]["prompts"]
    assert batch["type"] == "array" and batch["items"] == {"type": "string"} and batch["maxItems"] == 8
    handler = tools["create_pool"].input_schema["properties"]["handler"]
    assert set(handler["enum"]) == {"command", "echo", "fmt", None}
    create = tools["create_pool"].input_schema["properties"]
    assert create["backend"]["enum"] == ["local", "dask"] and create["backend"]["default"] == "local"
    assert create["address"]["enum"] == [None]  # this server allows no Dask cluster
    route = tools["route_to_pool"].input_schema["properties"]["selector"]
    assert route["default"] == "least_loaded" and "round_robin" in route["enum"]
    assert set(tools["execute_on_pool"].output_schema["required"]) >= {
        "pool_id",
        "task_id",
        "worker_id",
        "worker_pid",
        "duration",
        "result",
    }
    assert tools["list_pools"].annotations.read_only_hint is True
    assert tools["delete_pool"].annotations.destructive_hint is True


async def test_execute_returns_the_result_with_task_worker_pool_and_duration(client):
    """execute_on_pool returns the handler's result and which task, worker and pool ran it, and for how long."""
    out = await call(client, "execute_on_pool", pool_id="a", prompt="hello", context={"repo": "."}, timeout=10)
    assert out["result"]["prompt"] == "hello" and out["result"]["context"] == {"repo": "."}
    assert out["pool_id"] == "a"
    assert out["worker_pid"] == out["result"]["pid"]
    assert out["worker_pid"] in worker_pids(await call(client, "get_pool_status", pool_id="a"))
    assert out["worker_id"].startswith("a-w")
    assert isinstance(out["task_id"], int) and 0 <= out["duration"] < 10
    filled = await call(client, "execute_on_pool", pool_id="b", prompt="{0[name]}!", context={"name": "fmt"})
    assert filled["result"] == "fmt!" and filled["pool_id"] == "b"


async def test_batch_returns_every_result_and_each_failure_in_input_order(client):
    """execute_batch_on_pool runs every prompt; a failing prompt is reported in its slot, the others complete."""
    prompts = ["{0[x]}", "{", "{0[missing]}", "x={0[x]}"]
    out = await call(client, "execute_batch_on_pool", pool_id="b", prompts=prompts, context={"x": 7})
    assert (out["pool_id"], out["total"], out["completed"], out["failed"]) == ("b", 4, 2, 2)
    items = out["results"]
    assert [i["index"] for i in items] == [0, 1, 2, 3]
    assert [i["status"] for i in items] == ["completed", "failed", "failed", "completed"]
    assert items[0]["result"] == "7" and items[3]["result"] == "x=7"
    assert items[1]["error"].startswith("ValueError: ") and items[1]["result"] is None
    assert items[2]["error"].startswith("KeyError: ")
    pids = set(worker_pids(await call(client, "get_pool_status", pool_id="b")))
    assert all(i["worker_pid"] in pids and i["worker_id"].startswith("b-w") for i in items)
    assert len({i["task_id"] for i in items}) == 4


async def test_route_reports_the_pool_its_selector_chose(client):
    """route_to_pool runs a prompt on the pool the selector picks among one handler's pools; round_robin rotates."""
    await call(client, "create_pool", pool_id="a2", handler="echo")
    try:
        chosen = []
        for _ in range(4):
            out = await call(client, "route_to_pool", prompt="plain", handler="echo", selector="round_robin")
            assert out["selector"] == "round_robin" and out["handler"] == "echo"
            assert out["result"]["prompt"] == "plain"  # echo ran it, not str.format
            chosen.append(out["pool_id"])
        assert sorted(chosen) == ["a", "a", "a2", "a2"]
        default = await call(client, "route_to_pool", prompt="{0[x]}", context={"x": 1}, handler="fmt")
        assert default["selector"] == "least_loaded" and default["pool_id"] == "b" and default["result"] == "1"
    finally:
        await call(client, "delete_pool", pool_id="a2")


async def test_route_needs_a_handler_when_the_pools_run_several(client, tmp_path):
    """Without handler=, route_to_pool refuses to pick between pools of different handlers, whatever the selector."""
    marker = tmp_path / "ran"
    await call(client, "create_pool", pool_id="sh", handler="command")
    try:
        for selector in ["round_robin", "least_loaded", "random"] * 2:
            text = await refused(client, "route_to_pool", prompt=f"touch {marker}", selector=selector)
            assert "name a handler: the pools run several (echo, fmt)" in text
        text = await refused(client, "route_to_pool", prompt=f"touch {marker}", handler="command")
        assert "does not send prompts to 'command' pools" in text and "--allow-route-to-command" in text
        assert "not allowed here" in await refused(client, "route_to_pool", prompt="x", handler="os.system")
        assert not marker.exists()
        out = await call(client, "execute_on_pool", pool_id="sh", prompt="echo by id")  # by its id it still runs
        assert out["result"]["stdout"] == "by id\n"
    finally:
        await call(client, "delete_pool", pool_id="sh")


@pytest.mark.parametrize("allowed", [False, True])
async def test_route_reaches_a_command_pool_only_when_the_operator_allows_it(tmp_path, allowed):
    """A command pool is invisible to route_to_pool unless the server runs with --allow-route-to-command."""
    marker = tmp_path / "ran"
    flags = ["--handler", "echo", "--handler", "command"] + (["--allow-route-to-command"] if allowed else [])
    async with Client(stdio(*flags)) as c:
        await call(c, "create_pool", pool_id="sh", handler="command")
        await call(c, "create_pool", pool_id="e", handler="echo")
        if not allowed:
            for _ in range(3):
                out = await call(c, "route_to_pool", prompt=f"touch {marker}", selector="round_robin")
                assert out["pool_id"] == "e" and out["handler"] == "echo"
            assert "--allow-route-to-command" in await refused(c, "route_to_pool", prompt="x", handler="command")
            assert not marker.exists()
        else:
            assert "name a handler" in await refused(c, "route_to_pool", prompt=f"touch {marker}")
            out = await call(c, "route_to_pool", prompt=f"touch {marker}", handler="command")
            assert out["pool_id"] == "sh" and out["result"]["exit_code"] == 0
            assert marker.exists()


async def test_status_health_and_list_reflect_the_work_done(client):
    """get_pool_status, check_pool_health, list_pools and get_pool_manager_status count the tasks run."""
    before = await call(client, "get_pool_status", pool_id="a")
    await call(client, "execute_batch_on_pool", pool_id="a", prompts=["1", "2", "3"])
    status = await call(client, "get_pool_status", pool_id="a")
    assert status["tasks_completed"] == before["tasks_completed"] + 3
    assert status["state"] == "running" and status["handler_name"] == "echo"
    assert len(worker_pids(status)) == 3
    health = await call(client, "check_pool_health", pool_id="a")
    assert health["status"] == "healthy" and health["workers_healthy"] == 3
    listed = {p["pool_id"]: p for p in (await call(client, "list_pools"))["pools"]}
    assert listed["a"]["tasks_completed"] == status["tasks_completed"]
    assert listed["a"]["handler"] == "echo" and listed["b"]["handler"] == "fmt"
    assert listed["b"]["tasks_failed"] >= 2  # the batch test's failures
    manager = await call(client, "get_pool_manager_status")
    assert manager["pools_total"] == len(listed) and manager["pools_healthy"] == len(listed)
    assert {d["pool_id"] for d in manager["pool_details"]} == set(listed)
    assert manager["handlers"]["fmt"] == "builtins:str.format"
    assert manager["limits"] == {"max_pools": 16, "max_prompt_bytes": 4096, "max_batch": 8, "max_timeout": 30.0}


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        ("execute_on_pool", {"pool_id": "nope", "prompt": "x"}, "PoolNotFound: no pool 'nope'"),
        ("get_pool_status", {"pool_id": "nope"}, "PoolNotFound"),
        ("delete_pool", {"pool_id": "nope"}, "PoolNotFound"),
        ("create_pool", {"handler": "os.system"}, "'os.system' is not allowed here; allowed: command, echo, fmt"),
        ("create_pool", {}, "name a handler; allowed: command, echo, fmt"),
        ("create_pool", {"pool_id": "a", "handler": "echo"}, "already exists"),
        ("create_pool", {"pool_id": "../x", "handler": "echo"}, "pool_id '../x' must be"),
        ("create_pool", {"handler": "echo", "backend": "dask"}, "this server allows no Dask cluster"),
        (
            "create_pool",
            {"handler": "echo", "backend": "dask", "address": "tcp://127.0.0.1:8786"},
            "this server allows no Dask cluster",
        ),
        ("create_pool", {"handler": "echo", "address": "tcp://127.0.0.1:8786"}, "address is for backend 'dask'"),
        ("create_pool", {"handler": "echo", "backend": "ray"}, "backend must be one of local, dask, got 'ray'"),
        ("execute_on_pool", {"pool_id": "a", "prompt": "x" * 4097}, "prompt is 4097 bytes; the limit is 4096"),
        ("execute_on_pool", {"pool_id": "a", "prompt": "é" * 2049}, "prompt is 4098 bytes"),
        ("execute_on_pool", {"pool_id": "a", "prompt": "x", "context": {"k": "v" * 5000}}, "context (as JSON) is"),
        ("execute_on_pool", {"pool_id": "a", "prompt": "x", "timeout": 0}, "must be more than 0 and at most 30"),
        ("execute_on_pool", {"pool_id": "a", "prompt": "x", "timeout": -1}, "timeout must be more than 0"),
        ("execute_on_pool", {"pool_id": "a", "prompt": "x", "timeout": 31}, "at most 30 seconds"),
        ("execute_batch_on_pool", {"pool_id": "a", "prompts": ["x"] * 9}, "the batch has 9 prompts; the limit is 8"),
        ("execute_batch_on_pool", {"pool_id": "a", "prompts": []}, "at least one prompt"),
        ("execute_batch_on_pool", {"pool_id": "a", "prompts": ["x", "y" * 4097]}, "prompts[1] is 4097 bytes"),
        (
            "route_to_pool",
            {"prompt": "x", "handler": "echo", "selector": "first"},
            "unknown selector 'first'; known selectors:",
        ),
        ("execute_on_pool", {"pool_id": "b", "prompt": "{"}, "ValueError: Single '{' encountered"),
    ],
)
async def test_bad_requests_are_one_line_tool_errors_and_the_server_keeps_serving(client, tool, args, message):
    """Unknown pools, handlers outside the allow-list, broken limits and failing tasks are one-line tool errors."""
    text = await refused(client, tool, **args)
    assert message in text
    assert (await call(client, "execute_on_pool", pool_id="a", prompt="still here"))["result"]["prompt"] == "still here"


async def test_a_command_that_exits_non_zero_fails_with_its_exit_code_and_output(client):
    """A command task that exits 3 is a failed call naming the exit code and the command's stderr, not a result."""
    await call(client, "create_pool", pool_id="cmd3", handler="command")
    try:
        text = await refused(client, "execute_on_pool", pool_id="cmd3", prompt="echo oops >&2; exit 3")
        assert "CommandFailed: command sh -c " in text and "ended with exit code 3" in text and "oops" in text
        batch = await call(client, "execute_batch_on_pool", pool_id="cmd3", prompts=["exit 3", "true"])
        assert [i["status"] for i in batch["results"]] == ["failed", "completed"]
        kept = await call(client, "execute_on_pool", pool_id="cmd3", prompt="exit 3", context={"check": False})
        assert kept["result"]["exit_code"] == 3
    finally:
        await call(client, "delete_pool", pool_id="cmd3")


def test_timeouts_that_are_not_finite_numbers_are_refused():
    """A NaN or infinite timeout, sent as raw JSON, is a one-line tool error saying it must be finite."""
    proc = subprocess.Popen([*SERVER, "--handler", "echo"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _send(
            proc,
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": LATEST_HANDSHAKE_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"},
                },
            },
        )
        assert _receive(proc)["result"]["serverInfo"] == {"name": "procpool", "version": procpool.__version__}
        _send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        _send(
            proc,
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "create_pool", "arguments": {"pool_id": "p"}},
            },
        )
        assert _receive(proc)["result"]["isError"] is False
        for n, timeout in enumerate([float("nan"), float("inf"), float("-inf")], start=3):
            # json.dumps writes NaN and Infinity as bare literals, as a careless client would.
            _send(
                proc,
                {
                    "jsonrpc": "2.0",
                    "id": n,
                    "method": "tools/call",
                    "params": {
                        "name": "execute_on_pool",
                        "arguments": {"pool_id": "p", "prompt": "x", "timeout": timeout},
                    },
                },
            )
            reply = _receive(proc)["result"]
            assert reply["isError"] is True
            assert "timeout must be a finite number of seconds" in reply["content"][0]["text"], reply
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)


async def test_the_server_reports_the_package_version(client):
    """serverInfo carries procpool's version, not an empty string."""
    assert client.server_info.name == "procpool"
    assert client.server_info.version == procpool.__version__


EXITING = """
import sys


def leave(prompt, context):
    if prompt == "interrupt":
        raise KeyboardInterrupt
    if prompt.startswith("exit "):
        sys.exit(int(prompt.split()[1]))
    return prompt
"""


async def test_a_task_calling_sys_exit_fails_and_the_server_keeps_serving(tmp_path):
    """A handler calling sys.exit(3) or raising KeyboardInterrupt fails its call as TaskExited; the server serves on."""
    (tmp_path / "leaving.py").write_text(EXITING)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    params = StdioServerParameters(command=SERVER[0], args=[*SERVER[1:], "--handler", "leave=leaving:leave"], env=env)
    async with Client(params) as c:
        await call(c, "create_pool", pool_id="p")
        text = await refused(c, "execute_on_pool", pool_id="p", prompt="exit 3")
        assert "TaskExited: the task raised SystemExit(3)" in text
        assert (await call(c, "execute_on_pool", pool_id="p", prompt="next"))["result"] == "next"
        text = await refused(c, "execute_on_pool", pool_id="p", prompt="interrupt")
        assert "TaskExited: the task raised KeyboardInterrupt" in text
        batch = await call(c, "execute_batch_on_pool", pool_id="p", prompts=["exit 3", "fine", "interrupt"])
        assert [i["status"] for i in batch["results"]] == ["failed", "completed", "failed"]
        assert batch["results"][0]["error"].startswith("TaskExited: ") and batch["results"][1]["result"] == "fine"
        assert (await call(c, "route_to_pool", prompt="still here"))["result"] == "still here"
        assert (await call(c, "check_pool_health", pool_id="p"))["status"] == "healthy"


async def test_the_console_script_imports_handlers_from_the_working_directory(tmp_path):
    """procpool mcp, started as the console script, finds a handler module in its working directory."""
    (tmp_path / "localhandlers.py").write_text("def shout(prompt, context):\n    return prompt.upper()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    params = StdioServerParameters(
        command=str(SCRIPT), args=["mcp", "--handler", "shout=localhandlers:shout"], env=env, cwd=str(tmp_path)
    )
    async with Client(params) as c:
        await call(c, "create_pool", pool_id="local")
        assert (await call(c, "execute_on_pool", pool_id="local", prompt="hi"))["result"] == "HI"


async def test_a_task_past_its_timeout_is_killed_and_reported(client):
    """A command that outlives its timeout fails the call with TaskTimeout; its worker is replaced."""
    await call(client, "create_pool", pool_id="cmd", handler="command")
    before: set[int] = set()
    after: set[int] = set()
    try:
        before = set(worker_pids(await call(client, "get_pool_status", pool_id="cmd")))
        started = time.monotonic()
        text = await refused(client, "execute_on_pool", pool_id="cmd", prompt="sleep 30", timeout=0.5)
        assert "TaskTimeout: task timed out after 0.5 s" in text
        assert time.monotonic() - started < 20
        out = await call(client, "execute_on_pool", pool_id="cmd", prompt="echo ok")
        assert out["result"]["stdout"] == "ok\n" and out["result"]["exit_code"] == 0
        after = set(worker_pids(await call(client, "get_pool_status", pool_id="cmd")))
        assert len(before - after) == 1
    finally:
        await call(client, "delete_pool", pool_id="cmd")
    wait_exited(sorted(before | after))


async def test_delete_pool_stops_its_worker_processes(client):
    """delete_pool shuts the pool down: its three workers exit and the pool is gone from every listing."""
    await call(client, "create_pool", pool_id="doomed", handler="echo")
    pids = worker_pids(await call(client, "get_pool_status", pool_id="doomed"))
    assert len(pids) == 3 and all(psutil.pid_exists(p) for p in pids)
    out = await call(client, "delete_pool", pool_id="doomed")
    assert out == {"pool_id": "doomed", "deleted": True, "worker_pids": pids}
    wait_exited(pids)
    assert "doomed" not in {p["pool_id"] for p in (await call(client, "list_pools"))["pools"]}
    assert "PoolNotFound" in await refused(client, "execute_on_pool", pool_id="doomed", prompt="x")


async def test_dask_pools_go_only_to_a_scheduler_the_operator_allowed():
    """create_pool(backend="dask") runs a pool on the cluster allowed by --dask-address and never reaches another."""
    pytest.importorskip("distributed")
    from helpers import dask_cluster

    with socket.socket() as bait:
        # A listener at the address the agent asks for: a connection attempt would be waiting in it.
        bait.bind(("127.0.0.1", 0))
        bait.listen()
        bait.setblocking(False)
        chosen = f"tcp://127.0.0.1:{bait.getsockname()[1]}"
        async with dask_cluster() as cluster:
            allowed = cluster.scheduler_address
            cluster_pids = {w.pid for w in cluster.scheduler.workers.values()}
            async with Client(stdio("--handler", "echo", "--dask-address", allowed)) as c:
                text = await refused(c, "create_pool", pool_id="mine", backend="dask", address=chosen)
                assert f"Dask address '{chosen}' is not allowed here; allowed: {allowed}" in text
                with pytest.raises(BlockingIOError):
                    bait.accept()
                created = await call(c, "create_pool", pool_id="d", backend="dask")  # the only allowed address
                assert created["backend"] == "dask" and created["address"] == allowed
                assert {w["pid"] for w in created["workers"]} == cluster_pids
                assert (await call(c, "create_pool", pool_id="l"))["backend"] == "local"
                out = await call(c, "execute_on_pool", pool_id="d", prompt="hi")
                assert out["result"]["prompt"] == "hi" and out["result"]["pid"] in cluster_pids
                listed = {p["pool_id"]: p["backend"] for p in (await call(c, "list_pools"))["pools"]}
                assert listed == {"d": "dask", "l": "local"}
                assert (await call(c, "get_pool_manager_status"))["dask_addresses"] == [allowed]
                # The workers are the cluster's: deleting the pool stops its tasks, not them.
                assert (await call(c, "delete_pool", pool_id="d"))["worker_pids"] == []
            assert all(psutil.pid_exists(pid) for pid in cluster_pids)


# -- server lifetime -------------------------------------------------------------------------------


async def test_closing_the_client_stops_the_server_and_every_worker(tmp_path):
    """When the client disconnects, the server shuts every pool down and exits; no process is left."""
    before = {p.pid for p in psutil.Process().children()}
    log = tmp_path / "server.log"
    with log.open("w") as errlog:
        params = stdio("--handler", "echo", "--max-pools", "2", "--log-level", "info")
        async with Client(stdio_client(params, errlog=errlog)) as c:
            server = server_process(before)
            first = await call(c, "create_pool")  # the only handler is the default
            assert first["handler"] == "echo" and first["state"] == "running"
            await call(c, "create_pool", pool_id="second")
            assert "already has 2 pools, its limit (--max-pools)" in await refused(c, "create_pool", pool_id="third")
            await call(c, "execute_on_pool", pool_id="second", prompt="x")
            family = [server.pid, *(p.pid for p in server.children(recursive=True))]
            assert len(family) >= 6  # the server, its forkserver, and two pools of three workers
    wait_exited(family)
    assert stopped_in_order(log.read_text(), 2)


def _send(proc: subprocess.Popen[str], message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()


def _receive(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    return json.loads(proc.stdout.readline())


def test_stdout_carries_only_protocol_and_sigterm_stops_every_worker(tmp_path):
    """A handler printing to stdout cannot corrupt the stdio stream; SIGTERM shuts the pools down and exits."""
    stderr = (tmp_path / "stderr").open("w+")
    proc = subprocess.Popen(
        [*SERVER, "--handler", "say=builtins:print", "--log-level", "info"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        _send(
            proc,
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": LATEST_HANDSHAKE_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"},
                },
            },
        )
        assert _receive(proc)["result"]["serverInfo"]["name"] == "procpool"
        _send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        _send(
            proc,
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "create_pool", "arguments": {"pool_id": "noisy"}},
            },
        )
        pids = [w["pid"] for w in _receive(proc)["result"]["structuredContent"]["workers"]]
        _send(
            proc,
            {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "execute_on_pool", "arguments": {"pool_id": "noisy", "prompt": "NOISE"}},
            },
        )
        reply = _receive(proc)
        assert reply["id"] == 3 and reply["result"]["isError"] is False
        family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
        assert set(pids) <= set(family)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert proc.stdout is not None
        assert proc.stdout.read() == ""  # no stray bytes after the last reply
        wait_exited(family)
        stderr.seek(0)
        logged = stderr.read()
        assert "NOISE {}" in logged  # the handler's print went to stderr
        assert stopped_in_order(logged, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_http_transport_serves_the_tools_on_loopback(tmp_path):
    """With --http 127.0.0.1:PORT the tools work over streamable HTTP; SIGTERM stops the pools and the server."""
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [*SERVER, "--handler", "echo", "--http", f"127.0.0.1:{port}", "--log-level", "info"], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the HTTP server did not start listening"
                time.sleep(0.05)
        async with Client(f"http://127.0.0.1:{port}/mcp") as c:
            assert {t.name for t in (await c.list_tools()).tools} == TOOLS
            await call(c, "create_pool", pool_id="web")
            out = await call(c, "execute_on_pool", pool_id="web", prompt="over http")
            assert out["result"]["prompt"] == "over http" and out["pool_id"] == "web"
            family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
            assert out["worker_pid"] in family
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        wait_exited(family)
        assert stopped_in_order((tmp_path / "server.log").read_text(), 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# -- flags ---------------------------------------------------------------------------------------


def test_default_limits_are_those_of_the_issue():
    """Without flags: 16 pools, 1 MiB prompts, 1,000 prompts a batch, timeouts up to 3,600 s."""
    assert (DEFAULT_MAX_POOLS, DEFAULT_MAX_PROMPT_BYTES, DEFAULT_MAX_BATCH, DEFAULT_MAX_TIMEOUT) == (
        16,
        1024 * 1024,
        1000,
        3600.0,
    )
    config = ServerConfig({"echo": "procpool.handlers:echo"})
    assert config.limits() == {"max_pools": 16, "max_prompt_bytes": 1 << 20, "max_batch": 1000, "max_timeout": 3600.0}
    assert config.http is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"handlers": {}}, "allow at least one handler"),
        ({"handlers": {"x": "no_such_module:f"}}, "cannot be imported"),
        ({"handlers": {"echo": "procpool.handlers:echo"}, "max_pools": 0}, "max_pools must be a positive"),
        ({"handlers": {"echo": "procpool.handlers:echo"}, "max_timeout": float("inf")}, "max_timeout must be"),
        ({"handlers": {"echo": "procpool.handlers:echo"}, "http": ("10.0.0.1", 80)}, "not a loopback address"),
    ],
)
def test_server_config_checks_what_embedders_pass(kwargs, message):
    """ServerConfig, built in code rather than from flags, refuses the same bad values at once."""
    with pytest.raises(ValueError, match=message):
        ServerConfig(**kwargs)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "allow at least one handler"),
        (["--handler", "shell"], "'shell' is not a built-in handler (built-ins: command, echo)"),
        (["--handler", "x=no.such.module:f"], "cannot be imported"),
        (["--handler", "x=os.path"], "must point at 'package.module:function'"),
        (["--handler", "9x=builtins:print"], "handler name '9x' must be"),
        (["--handler", "x=builtins:print", "--handler", "x=builtins:repr"], "given twice"),
        (["--handler", "echo", "--http", "0.0.0.0:8000"], "not a loopback address"),
        (["--handler", "echo", "--http", "example.com:8000"], "not a loopback address"),
        (["--handler", "echo", "--http", "8000"], "expected HOST:PORT"),
        (["--handler", "echo", "--http", "127.0.0.1:70000"], "between 1 and 65535"),
        (["--handler", "echo", "--max-pools", "0"], "--max-pools"),
        (["--handler", "echo", "--max-timeout", "0"], "--max-timeout"),
        (["--handler", "echo", "--max-timeout", "nan"], "nan is not a finite number of seconds"),
        (["--handler", "echo", "--dask-address", "10.0.0.5:8786"], "looks like tcp://HOST:PORT"),
        (["--handler", "echo", "--dask-address", "tcp://10.0.0.5:0"], "between 1 and 65535"),
    ],
)
def test_bad_flags_exit_2_before_serving(flags, message):
    """Bad flags stop the command with exit code 2 and a message, before any server or worker starts."""
    result = CliRunner().invoke(mcp_command, flags)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_loopback_addresses_are_accepted():
    """--http takes IPv4 and IPv6 loopback addresses and localhost."""
    from procpool.mcp_server import parse_http

    assert parse_http("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_http("127.0.0.2:1") == ("127.0.0.2", 1)
    assert parse_http("[::1]:8765") == ("::1", 8765)
    assert parse_http("localhost:8765") == ("localhost", 8765)
