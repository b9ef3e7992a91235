"""envd's `process.Process` service, on a sandbox's exec streams (`StreamHub`): nothing about
running a process is done here that treadle's own exec does not do.

- `Start` opens an exec stream; its first event is the process's start (its pid as the
  sandbox sees it), then its output as it comes, then its end. `Connect-Timeout-Ms` is the
  process's lifetime (the node kills it then), as envd does; a client that goes away leaves
  the process running, as envd does.
- `Connect` attaches again: the output kept while nobody followed the process comes first
  (treadle keeps it; envd drops it), then live output.
- `SendInput`, `CloseStdin`, `Update` (PTY size) go through the stream following the process
  when this Weaver holds one (its `Start` or `Connect`), else through a short attach.
- `List` and `SendSignal` are the processes routes' own calls.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from treadle.domain.errors import TreadleError
from treadle.domain.sandbox import MAX_CWD, MAX_TAG, check_argv, check_env
from treadle.protocol import ProcessCall
from treadle.protocol.limits import INT32_MAX
from treadle.weaver.api.sandboxes import running_node
from treadle.weaver.core import Weaver
from treadle.weaver.envd.access import EnvdCaller
from treadle.weaver.envd.errors import caller_of, connect_error, failed
from treadle.weaver.envd.gen.process import process_pb as pb
from treadle.weaver.envd.gen.process.process_connect import Process
from treadle.weaver.services.nodes import NodeSession
from treadle.weaver.services.streams import Ended, ExecStream

__all__ = ["ProcessService"]

# E2B's signals, by their enum's numbers: exactly the POSIX ones they name.
_SIGNALS = {pb.Signal.SIGTERM: signal.SIGTERM, pb.Signal.SIGKILL: signal.SIGKILL}
_MAX_TIMEOUT_S = 7 * 24 * 3600.0


def _event(**event: Any) -> pb.ProcessEvent:
    ((name, value),) = event.items()
    return pb.ProcessEvent(event=Oneof(name, value))  # type: ignore[arg-type]


def _end_event(ended: Ended) -> pb.ProcessEvent:
    if ended.signal is not None:
        status = f"signal: {signal.Signals(ended.signal).name.removeprefix('SIG').lower()}"
        if ended.signal == signal.SIGKILL:
            status = "signal: killed"
        end = pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=status, error=status)
    elif ended.exit_code is not None:
        end = pb.ProcessEvent.EndEvent(
            exit_code=ended.exit_code, exited=True, status=f"exit status {ended.exit_code}"
        )
    else:
        end = pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status="error")
    if ended.error is not None and ended.signal is None:
        end.error = ended.error
    return _event(end=end)


def _data_event(channel: str, data: bytes, pty: bool) -> pb.ProcessEvent:
    field = "pty" if pty else channel
    output: Any = Oneof(field, data)
    return _event(data=pb.ProcessEvent.DataEvent(output=output))


def _process(config: pb.ProcessConfig, tag: str) -> tuple[list[str], dict[str, str]]:
    """The argv and env of a StartRequest, held to treadle's own exec rules."""
    argv, env, cwd = [config.cmd, *config.args], dict(config.envs), config.cwd
    try:
        check_argv(argv)
        check_env(env)
    except ValueError as exc:
        raise ConnectError(Code.INVALID_ARGUMENT, f"process: {exc}") from None
    if len(cwd) > MAX_CWD or "\x00" in cwd:
        raise ConnectError(
            Code.INVALID_ARGUMENT, f"process.cwd is at most {MAX_CWD} characters, without NUL"
        )
    if len(tag) > MAX_TAG:
        raise ConnectError(Code.INVALID_ARGUMENT, f"tag is at most {MAX_TAG} characters")
    return argv, env


def _selector(selector: pb.ProcessSelector | None) -> tuple[int | None, str | None]:
    chosen = None if selector is None else selector.selector
    if chosen is None:
        raise ConnectError(Code.INVALID_ARGUMENT, "a process selector (pid or tag) is required")
    if chosen.field == "pid":
        if not 1 <= int(chosen.value) <= INT32_MAX:
            raise ConnectError(Code.NOT_FOUND, f"no process with pid {chosen.value}")
        return int(chosen.value), None
    if not 1 <= len(str(chosen.value)) <= MAX_TAG:
        raise ConnectError(Code.INVALID_ARGUMENT, "a tag is 1-256 characters")
    return None, str(chosen.value)


class ProcessService(Process):
    def __init__(self, weaver: Weaver) -> None:
        self._weaver = weaver
        # The stream following each process (sandbox id, pid) while a Start or Connect of
        # this Weaver's holds it, so that input reaches the process through it.
        self._following: dict[tuple[str, int], tuple[ExecStream, bool]] = {}

    async def _caller(self, ctx: RequestContext[Any, Any]) -> EnvdCaller:
        return await caller_of(self._weaver, ctx.request_headers)

    async def start(
        self, request: pb.StartRequest, ctx: RequestContext[pb.StartRequest, pb.StartResponse]
    ) -> AsyncIterator[pb.StartResponse]:
        caller = await self._caller(ctx)
        config = request.process
        if config is None or not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        argv, env = _process(config, request.tag)
        timeout_ms = ctx.timeout_ms
        timeout_s = None if timeout_ms is None else min(max(timeout_ms, 1.0) / 1000, _MAX_TIMEOUT_S)
        pty = None
        if request.pty is not None and request.pty.size is not None:
            size = request.pty.size
            pty = (min(max(size.rows, 1), 1000), min(max(size.cols, 1), 1000))
        row, session = await _on_node(self._weaver, caller)
        try:
            stream = self._weaver.streams.open(
                session,
                caller.tenant_id,
                row.id,
                row.incarnation,
                argv,
                env=env,
                cwd=config.cwd or None,
                tag=request.tag or None,
                # Absent: a stdin, as older clients expect.
                stdin=request.stdin if request.has_field("stdin") else True,
                pty=pty,
                timeout_s=timeout_s,
                user=caller.user,
            )
        except TreadleError as exc:  # the tenant's streams at their limit
            raise connect_error(exc) from None
        async for event in self._follow(caller, stream, pty is not None):
            yield pb.StartResponse(event=event)

    async def connect(
        self, request: pb.ConnectRequest, ctx: RequestContext[pb.ConnectRequest, pb.ConnectResponse]
    ) -> AsyncIterator[pb.ConnectResponse]:
        caller = await self._caller(ctx)
        pid, tag = _selector(request.process)
        listed = (await _result(await self._call(caller, "list", None, None))) or []
        pty = any(
            isinstance(item, dict)
            and item.get("pty")
            and (item.get("pid"), item.get("tag"))
            in ((pid, item.get("tag")), (item.get("pid"), tag))
            for item in listed
        )
        stream = await self._call(caller, "attach", pid, tag)
        async for event in self._follow(caller, stream, pty):
            yield pb.ConnectResponse(event=event)

    async def _follow(
        self, caller: EnvdCaller, stream: ExecStream, pty: bool
    ) -> AsyncIterator[pb.ProcessEvent]:
        key: tuple[str, int] | None = None
        try:
            started = await stream.started()
            if started is None or started.pid is None:
                raise failed(await stream.wait(), "the process did not start")
            key = (caller.sandbox_id, started.pid)
            self._following[key] = (stream, pty)
            yield _event(start=pb.ProcessEvent.StartEvent(pid=started.pid))
            async for channel, data in stream.output():
                yield _data_event(channel, data, pty)
            yield _end_event(await stream.wait())
        finally:
            if key is not None and self._following.get(key, (None,))[0] is stream:
                del self._following[key]
            if stream.ended is None:
                stream.detach()  # the client went: the process runs on, as in envd

    async def list(
        self, request: pb.ListRequest, ctx: RequestContext[pb.ListRequest, pb.ListResponse]
    ) -> pb.ListResponse:
        caller = await self._caller(ctx)
        stream = await self._call(caller, "list", None, None)
        items = (await _result(stream)) or []
        processes = [
            pb.ProcessInfo(
                config=pb.ProcessConfig(cmd=item["argv"][0], args=item["argv"][1:]),
                pid=item["pid"],
                tag=item.get("tag") or None,
            )
            for item in items
            if isinstance(item, dict) and item.get("running") and item.get("argv")
        ]
        return pb.ListResponse(processes=processes)

    async def send_signal(
        self,
        request: pb.SendSignalRequest,
        ctx: RequestContext[pb.SendSignalRequest, pb.SendSignalResponse],
    ) -> pb.SendSignalResponse:
        caller = await self._caller(ctx)
        pid, tag = _selector(request.process)
        number = _SIGNALS.get(request.signal)
        if number is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "signal must be SIGTERM or SIGKILL")
        view = await _result(await self._call(caller, "signal", pid, tag, signal=int(number)))
        if not (isinstance(view, dict) and view.get("running")):
            # As envd: a process that already ended is not there to signal (the SDK's
            # `kill` then says False).
            raise ConnectError(Code.NOT_FOUND, f"process {pid or tag} is not running")
        return pb.SendSignalResponse()

    async def send_input(
        self,
        request: pb.SendInputRequest,
        ctx: RequestContext[pb.SendInputRequest, pb.SendInputResponse],
    ) -> pb.SendInputResponse:
        caller = await self._caller(ctx)
        await self._through_stream(caller, request.process, _writer(_input(request.input)))
        return pb.SendInputResponse()

    async def stream_input(
        self,
        request: AsyncIterator[pb.StreamInputRequest],
        ctx: RequestContext[pb.StreamInputRequest, pb.StreamInputResponse],
    ) -> pb.StreamInputResponse:
        caller = await self._caller(ctx)
        selector: pb.ProcessSelector | None = None
        async for message in request:
            event = message.event
            if event is None or event.field == "keepalive":
                continue
            if event.field == "start":
                selector = event.value.process
                continue
            if selector is None:
                raise ConnectError(Code.INVALID_ARGUMENT, "input before the start event")
            await self._through_stream(caller, selector, _writer(_input(event.value.input)))
        return pb.StreamInputResponse()

    async def close_stdin(
        self,
        request: pb.CloseStdinRequest,
        ctx: RequestContext[pb.CloseStdinRequest, pb.CloseStdinResponse],
    ) -> pb.CloseStdinResponse:
        caller = await self._caller(ctx)
        await self._through_stream(caller, request.process, lambda s: s.write(b"", eof=True))
        return pb.CloseStdinResponse()

    async def update(
        self, request: pb.UpdateRequest, ctx: RequestContext[pb.UpdateRequest, pb.UpdateResponse]
    ) -> pb.UpdateResponse:
        caller = await self._caller(ctx)
        size = None if request.pty is None else request.pty.size
        if size is not None:
            rows, cols = min(max(size.rows, 1), 1000), min(max(size.cols, 1), 1000)
            await self._through_stream(caller, request.process, lambda s: s.resize(rows, cols))
        return pb.UpdateResponse()

    async def _through_stream(
        self,
        caller: EnvdCaller,
        selector: pb.ProcessSelector | None,
        act: Callable[[ExecStream], None],
    ) -> None:
        """Do `act` on the stream following the process: the one held here, else a short
        attach, left once the node has taken what was sent."""
        pid, tag = _selector(selector)
        held = self._following.get((caller.sandbox_id, pid)) if pid is not None else None
        if held is not None and not held[0].over:
            act(held[0])
            await held[0].drain()
            return
        stream = await self._call(caller, "attach", pid, tag)
        try:
            if await stream.started() is None:
                raise failed(await stream.wait(), "no such process")
            act(stream)
            await stream.drain()
        finally:
            if stream.ended is None:
                stream.detach()

    async def _call(
        self, caller: EnvdCaller, op: str, pid: int | None, tag: str | None, **fields: Any
    ) -> ExecStream:
        row, session = await _on_node(self._weaver, caller)
        if pid is not None:
            fields["pid"] = pid
        if tag is not None:
            fields["tag"] = tag
        try:
            return self._weaver.streams.start(
                session, caller.tenant_id, ProcessCall, row.id, row.incarnation, op=op, **fields
            )
        except TreadleError as exc:  # the tenant's streams at their limit
            raise connect_error(exc) from None


def _input(given: pb.ProcessInput | None) -> bytes:
    """What a ProcessInput carries, stdin or a PTY's keys alike (the stream takes either)."""
    chosen = None if given is None else given.input
    return b"" if chosen is None else bytes(chosen.value)


def _writer(data: bytes) -> Callable[[ExecStream], None]:
    return lambda stream: stream.write(data)


async def _result(stream: ExecStream) -> Any:
    ended = await stream.wait()
    if ended.error is not None:
        raise failed(ended, ended.error)
    return ended.result


async def _on_node(weaver: Weaver, caller: EnvdCaller) -> tuple[Any, NodeSession]:
    try:
        return await running_node(weaver, caller.tenant_id, caller.sandbox_id)
    except TreadleError as exc:
        raise connect_error(exc) from None
