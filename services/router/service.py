"""The router service: consumes ``flywheel.requests``, routes each request by the pure rules in
``routing.py``, produces the response (to the request's reply topic) and one ``Interaction``.

Concurrency: different conversations are served concurrently (at most ``max_in_flight``), the requests of
one conversation strictly in order. Offsets: a request's offset is committed only once its response and its
interaction (or its dead letter) are acknowledged by the broker, and never past an older request still in
flight. If even the dead letter cannot be sent, the router stops without committing that offset, so the
request is served again after the restart. Several routers share the requests topic as one consumer group:
a router commits only partitions it owns, and when a rebalance takes partitions away it first finishes and
commits their requests in flight, so the next owner neither serves them again nor skips one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from services.core import topics
from services.core.agents import AgentsFile, UnknownAgentError, load_agents
from services.core.codec import AvroCodec, DecodeError
from services.core.health import clear_ready, mark_ready
from services.core.kafka import Publisher, create_consumer, create_follower, create_producer, dead_letter_for
from services.core.offsets import OffsetTracker
from services.core.records import (
    AgentControl,
    Answer,
    DatasetSnapshot,
    InferenceRequest,
    InferenceResponse,
    Interaction,
    ModelEvent,
    RetrainTriggered,
    utcnow,
)
from services.core.settings import Settings
from services.core.student import StudentAnswer, StudentClient, StudentUnavailable
from services.router import plan as plan_logic
from services.router import routing
from services.router.state import RouterState
from services.router.tool_calls import student_tool_calls
from services.teacher.base import (
    Completion,
    Teacher,
    TeacherError,
    approx_tokens,
    messages_tokens,
    teacher_options,
)

log = logging.getLogger("flywheel.router")
SERVICE = "router"
GROUP = "flywheel-router"


@dataclass
class Outcome:
    response: InferenceResponse
    interaction: Interaction | None
    # Plan-and-execute: the steps' interactions (or the direct fallback's), beside the plan's in `interaction`.
    steps: list[Interaction] = field(default_factory=list)
    # A shadow sample: the response is ready, the interaction waits for the teacher's answer (off the response
    # path); ``settled`` gives it.
    pending: Awaitable[Interaction] | None = None

    async def settled(self) -> Interaction:
        if self.interaction is None:
            assert self.pending is not None
            self.interaction = await self.pending
            self.pending = None
        return self.interaction


def request_tokens(request: InferenceRequest) -> int:
    """The request's messages in approximate tokens (where no model reported what it read)."""
    return messages_tokens(request.messages)


class Router:
    def __init__(
        self,
        settings: Settings,
        agents: AgentsFile,
        teachers: dict[str, Teacher],
        student: StudentClient,
        codec: AvroCodec | None = None,
        rng: random.Random | None = None,
        max_in_flight: int = 512,
    ) -> None:
        self.settings = settings
        self.agents = agents
        # How each agent's teacher requests are shaped: fixed for the router's life, so made once, not per request.
        self.teacher_options = {agent_id: teacher_options(cfg) for agent_id, cfg in agents.agents.items()}
        self.teachers = teachers
        self.student = student
        self.codec = codec or AvroCodec()
        self.rng = rng or random.Random()
        self.state = RouterState(agents)
        self.max_in_flight = max_in_flight
        self.stats: Counter[str] = Counter()
        self.publisher: Publisher | None = None
        self._tails: dict[str, asyncio.Future] = {}
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._background: set[asyncio.Task] = set()
        self._tasks: set[asyncio.Task] = set()  # requests being served
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self._requests: AIOKafkaConsumer | None = None

    # Model calls --------------------------------------------------------------------------------------
    def _teacher_for(self, agent_id: str) -> Teacher:
        from services.teacher.base import teacher_address

        cfg = self.agents.agent(agent_id).teacher
        return self.teachers.get(teacher_address(self.settings, cfg), self.teachers[""])

    async def _ask_teacher(self, request: InferenceRequest) -> Answer:
        cfg = self.agents.agent(request.agent_id).teacher
        t0 = time.perf_counter()
        try:
            done: Completion = await asyncio.wait_for(
                self._teacher_for(request.agent_id).complete(
                    request.messages,
                    model=cfg.model,
                    tools=request.tools,
                    max_tokens=cfg.max_tokens,
                    options=self.teacher_options[request.agent_id],
                ),
                cfg.timeout_s,
            )
        except (TeacherError, asyncio.TimeoutError) as exc:
            self.stats["teacher_errors"] += 1
            reason = str(exc) or f"no answer within {cfg.timeout_s:.0f}s"
            return Answer(model=cfg.model, latency_ms=(time.perf_counter() - t0) * 1000, error=reason)
        prices = self.state.tier(request.agent_id).teacher
        return Answer(
            content=done.content,
            tool_calls=done.tool_calls,
            model=done.model or cfg.model,
            latency_ms=done.latency_ms,
            input_tokens=done.input_tokens,
            output_tokens=done.output_tokens,
            cost_usd=prices.cost(done.input_tokens, done.output_tokens),
            finish_reason=done.finish_reason,
        )

    async def _ask_student(self, request: InferenceRequest, version: int | None) -> Answer:
        try:
            got: StudentAnswer = await self.student.answer(request.agent_id, request.messages, request.tools, version)
        except StudentUnavailable as exc:
            self.stats["student_errors"] += 1
            log.warning("%s", exc)
            return Answer(model=f"student:{request.agent_id}", latency_ms=0.0, error=str(exc))
        prices = self.state.tier(request.agent_id).student
        # Billed on what the student read and generated (Triton reports both); an estimate only from a version
        # that does not report them.
        tokens_in = got.input_tokens if got.input_tokens is not None else request_tokens(request)
        tokens_out = got.output_tokens if got.output_tokens is not None else approx_tokens(got.text)
        calls = student_tool_calls(got.text, request.tools)
        return Answer(
            content=got.text,
            tool_calls=calls,
            finish_reason="tool_calls" if calls else None,
            model=got.model,
            model_version=got.model_version,
            confidence=got.confidence,
            latency_ms=got.latency_ms,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_usd=prices.cost(tokens_in, tokens_out),
        )

    # One request --------------------------------------------------------------------------------------
    async def serve(self, request: InferenceRequest, received_at: datetime) -> Outcome:
        """Route one request and build its response and interaction(s) (no Kafka I/O: testable alone)."""
        if self.agents.agent(request.agent_id).execution.mode == "plan_and_execute":
            return await self._serve_plan(request, received_at)
        return await self._serve_direct(request, received_at, background_shadow=True)

    async def _serve_direct(
        self,
        request: InferenceRequest,
        received_at: datetime,
        first: routing.Plan | None = None,
        background_shadow: bool = False,
    ) -> Outcome:
        """One answer for the request by the routing rules (``first`` forces the first routing decision).

        With ``background_shadow``, a shadow sample's teacher call runs after the response is ready: the client
        never waits for it, and the interaction (``Outcome.pending``) is complete when the teacher answered."""
        view = self.state.view(request.agent_id)
        rt = self.state.runtime_of(request.agent_id)
        first = first or routing.plan(view, self.rng.random())
        teacher: Answer | None = None
        student: Answer | None = None
        shadow = training = False
        if routing.counts_for_canary(first):
            self.state.count_eligible(request.agent_id)
        shadow_call: asyncio.Future[Answer] | None = None
        if first.ask_student:
            student = await self._ask_student(request, rt.lifecycle.model_version)
            after = routing.after_student(view, student.confidence, student.error is not None, self.rng.random())
            served_by, reason, shadow, training = after.served_by, after.reason, after.shadow, after.training_candidate
            if after.call_teacher and served_by == "student" and background_shadow:
                shadow_call = asyncio.ensure_future(self._ask_teacher(request))
            elif after.call_teacher:
                teacher = await self._ask_teacher(request)
        else:
            # Every answer the teacher serves (grace period, pinned teacher, canary hold-out) is training data.
            served_by, reason, training = "teacher", first.reason, True
            teacher = await self._ask_teacher(request)
        served = student if served_by == "student" else teacher
        assert served is not None
        responded_at = utcnow()
        latency_ms = (responded_at - received_at).total_seconds() * 1000
        error = served.error
        # What the teacher alone would have cost when it did not run: the request and the full answer, at about
        # four characters a token (the student's own counts are of its compact prompt and answer).
        estimate = routing.Usage(request_tokens(request), approx_tokens(served.content))
        tier = self.state.tier(request.agent_id)

        def usage(answer: Answer | None) -> routing.Usage | None:
            return routing.Usage(answer.input_tokens, answer.output_tokens) if answer and not answer.error else None

        student_usage = usage(student)
        response_costs = routing.costs(tier, usage(teacher), student_usage, estimate)
        response = InferenceResponse(
            request_id=request.request_id,
            conversation_id=request.conversation_id,
            agent_id=request.agent_id,
            content=None if error else served.content,
            tool_calls=[] if error else served.tool_calls,
            served_by="none" if error else served_by,
            model_version=served.model_version,
            confidence=served.confidence,
            latency_ms=latency_ms,
            cost_usd=response_costs.cost_usd,
            error=error,
            input_tokens=0 if error else served.input_tokens,
            output_tokens=0 if error else served.output_tokens,
            finish_reason=None if error else (served.finish_reason or ("tool_calls" if served.tool_calls else "stop")),
        )
        stage = rt.lifecycle.stage

        def interaction_with(teacher: Answer | None) -> Interaction:
            costs = routing.costs(tier, usage(teacher), student_usage, estimate)
            return Interaction(
                request_id=request.request_id,
                conversation_id=request.conversation_id,
                agent_id=request.agent_id,
                messages=request.messages,
                tools=request.tools,
                intent=request.intent,
                metadata=request.metadata,
                teacher=teacher,
                student=student,
                served_by="none" if error else served_by,
                route_reason=reason,
                shadow=shadow,
                training_candidate=training and teacher is not None and teacher.error is None,
                lifecycle_stage=stage,
                cost_usd=costs.cost_usd,
                teacher_only_cost_usd=costs.teacher_only_cost_usd,
                received_at=received_at,
                responded_at=responded_at,
            )

        async def after_shadow(call: asyncio.Future[Answer]) -> Interaction:
            return interaction_with(await call)

        self.stats[f"served_by_{response.served_by}"] += 1
        self.stats[f"reason_{reason}"] += 1
        if shadow_call is not None:
            return Outcome(response, None, pending=after_shadow(shadow_call))
        return Outcome(response, interaction_with(teacher))

    # Plan-and-execute (plan.py) -----------------------------------------------------------------------
    async def _serve_plan(self, request: InferenceRequest, received_at: datetime) -> Outcome:
        """The teacher's plan, then each step routed like a direct request, in order (a step may rely on the
        one before); one response with every step's answer. A plan that cannot be used is recorded
        (``plan_invalid``) and the request answered directly by the teacher (``plan_fallback``)."""
        cfg = self.agents.agent(request.agent_id)
        stage = self.state.runtime_of(request.agent_id).lifecycle.stage
        max_steps = cfg.execution.max_steps
        # No tools on the planning request: the plan is JSON content, not a tool call.
        plan_request = request.model_copy(
            update={"messages": plan_logic.plan_messages(request.messages, max_steps), "tools": None}
        )
        answer = await self._ask_teacher(plan_request)
        planned_at = utcnow()
        try:
            if answer.error is not None:
                raise plan_logic.PlanError(f"the teacher gave no plan: {answer.error}")
            if answer.finish_reason == "length":
                raise plan_logic.PlanError("the teacher's plan was cut off (finish_reason length; raise max_tokens)")
            plan = plan_logic.parse_plan(
                answer.content,
                max_steps=max_steps,
                valid_tools=cfg.output.valid_tools,
                valid_intents=cfg.output.intents,
            )
        except plan_logic.PlanError as exc:
            self.stats["plans_invalid"] += 1
            log.warning("router: %s (agent %s): %s; answering directly", request.request_id, request.agent_id, exc)
            direct = request.model_copy(
                update={
                    "request_id": plan_logic.fallback_request_id(request.request_id),
                    "metadata": plan_logic.plan_metadata(request, None),
                }
            )
            out = await self._serve_direct(direct, planned_at, first=routing.Plan(False, routing.PLAN_FALLBACK))
            plan_row = self._plan_interaction(
                plan_request, request, answer, None, str(exc), stage, received_at, planned_at
            )
            response = out.response.model_copy(
                update={
                    "request_id": request.request_id,
                    "cost_usd": answer.cost_usd + out.response.cost_usd,
                    "latency_ms": (utcnow() - received_at).total_seconds() * 1000,
                }
            )
            return Outcome(response, plan_row, [out.interaction])
        self.stats["plans"] += 1
        steps: list[Interaction] = []
        results: list[plan_logic.StepResult] = []
        for index, step in enumerate(plan.steps):
            out = await self._serve_direct(plan_logic.step_request(request, plan, index), utcnow())
            got = out.response
            steps.append(out.interaction)
            results.append(
                plan_logic.StepResult(
                    index=index,
                    instruction=step.instruction,
                    served_by=got.served_by,
                    content=got.content,
                    tool_calls=tuple(got.tool_calls),
                    confidence=got.confidence,
                    model_version=got.model_version,
                    error=got.error,
                    cost_usd=out.interaction.cost_usd,
                )
            )
        combined = plan_logic.combine(answer.cost_usd, results)
        responded_at = utcnow()
        response = InferenceResponse(
            request_id=request.request_id,
            conversation_id=request.conversation_id,
            agent_id=request.agent_id,
            content=combined.content,
            tool_calls=combined.tool_calls,
            served_by=combined.served_by,
            model_version=combined.model_version,
            confidence=combined.confidence,
            latency_ms=(responded_at - received_at).total_seconds() * 1000,
            cost_usd=combined.cost_usd,
            error=combined.error,
        )
        plan_row = self._plan_interaction(plan_request, request, answer, plan, None, stage, received_at, planned_at)
        return Outcome(response, plan_row, steps)

    def _plan_interaction(
        self,
        plan_request: InferenceRequest,
        request: InferenceRequest,
        answer: Answer,
        plan: plan_logic.ExecutionPlan | None,
        error: str | None,
        stage: str,
        received_at: datetime,
        planned_at: datetime,
    ) -> Interaction:
        """The plan's own interaction, under the request's id. Not training data: the student executes steps,
        it does not plan. Its cost is the planning call alone (each step's interaction carries its own)."""
        ok = error is None
        return Interaction(
            request_id=request.request_id,
            conversation_id=request.conversation_id,
            agent_id=request.agent_id,
            messages=plan_request.messages,
            tools=None,
            intent=request.intent,
            metadata=plan_logic.plan_metadata(request, plan, error),
            teacher=answer,
            served_by="teacher" if ok else "none",
            route_reason=routing.PLAN if ok else routing.PLAN_INVALID,
            training_candidate=False,
            lifecycle_stage=stage,
            cost_usd=answer.cost_usd,
            teacher_only_cost_usd=answer.cost_usd,
            received_at=received_at,
            responded_at=planned_at,
        )

    # Kafka wiring -------------------------------------------------------------------------------------
    async def _dead_letter(self, msg: ConsumerRecord, kind: str, reason: str) -> None:
        assert self.publisher is not None
        await self.publisher.send(topics.REQUESTS.dlq, dead_letter_for(msg, kind, reason, SERVICE), msg.key)
        self.stats[f"dlq_{kind}"] += 1

    async def _handle(self, msg: ConsumerRecord, previous: Awaitable | None) -> None:
        tp = TopicPartition(msg.topic, msg.partition)
        try:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous  # same conversation: strictly after the earlier request
            try:
                await self._process(msg)
            except Exception as exc:  # a bug must not lose the record: it goes to the DLQ with the reason
                log.exception("router: request at %s[%d]@%d failed", msg.topic, msg.partition, msg.offset)
                await self._dead_letter(msg, "processing", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # not answered and not dead-lettered: keep the offset, stop, serve it again
            self._give_up(msg, exc)
        else:
            self._tracker.finished(tp, msg.offset)
        finally:
            self._slots.release()

    def _give_up(self, msg: ConsumerRecord, exc: BaseException) -> None:
        log.error(
            "router: request at %s[%d]@%d was neither answered nor dead-lettered (%s: %s); stopping without "
            "committing it, so it is served again after the restart",
            msg.topic,
            msg.partition,
            msg.offset,
            type(exc).__name__,
            exc,
        )
        self.stats["unacknowledged"] += 1
        if self._fatal is None:
            self._fatal = exc
        self._stop.set()

    async def _process(self, msg: ConsumerRecord) -> None:
        assert self.publisher is not None
        received_at = utcnow()
        try:
            request = self.codec.decode(msg.value, InferenceRequest)
        except DecodeError as err:
            log.warning("router: %s[%d]@%d to DLQ: %s", msg.topic, msg.partition, msg.offset, err)
            await self._dead_letter(msg, err.kind, err.reason)
            return
        reply_topic = request.reply_topic or topics.RESPONSES.name
        try:
            outcome = await self.serve(request, received_at)
        except Exception as exc:  # whatever failed, the client gets a response with the reason, not silence
            if isinstance(exc, UnknownAgentError):
                kind, reason = "unknown_agent", str(exc)
            else:
                log.exception("router: request %s of %s failed", request.request_id, request.agent_id)
                kind, reason = "processing", f"{type(exc).__name__}: {exc}"
            await self._dead_letter(msg, kind, reason)
            error = InferenceResponse(
                request_id=request.request_id,
                conversation_id=request.conversation_id,
                agent_id=request.agent_id,
                error=reason,
            )
            await self.publisher.send(reply_topic, error, request.conversation_id)
            return
        if outcome.response.error:
            await self._dead_letter(msg, "processing", outcome.response.error)
        sent = [await self.publisher.send_nowait(reply_topic, outcome.response, request.conversation_id)]
        # A shadow sample's teacher answers after the response went out; the offset is marked done only when its
        # interaction is sent too (this coroutine returns).
        interaction = await outcome.settled()
        sent.append(await self.publisher.send_nowait(topics.INTERACTIONS, interaction, request.request_id))
        for step in outcome.steps:  # plan-and-execute: every step is an interaction of its own
            sent.append(await self.publisher.send_nowait(topics.INTERACTIONS, step, step.request_id))
        for fut in sent:
            await fut

    def _dispatch(self, msg: ConsumerRecord) -> None:
        """Start serving a record, after any earlier request of the same conversation."""
        self._tracker.started(TopicPartition(msg.topic, msg.partition), msg.offset)
        key = msg.key.decode(errors="replace") if msg.key else f"{msg.partition}:{msg.offset}"
        previous = self._tails.get(key)
        task = asyncio.ensure_future(self._handle(msg, previous))
        self._tails[key] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t, k=key: self._tails.pop(k, None) if self._tails.get(k) is t else None)

    async def _follow_lifecycle(self, consumer: AIOKafkaConsumer) -> None:
        """Apply lifecycle and control events as they arrive (ids already seen are skipped)."""
        while True:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for msg in messages:
                    try:
                        record = self.codec.decode(msg.value)
                    except DecodeError as err:
                        log.warning("router: undecodable record on %s: %s", msg.topic, err)
                        continue
                    if isinstance(record, AgentControl):
                        refused = self.state.apply_control(record)
                        if refused:
                            log.error("router: control change refused: %s", refused)
                    elif isinstance(record, ModelEvent | RetrainTriggered | DatasetSnapshot):
                        self.state.apply_lifecycle(record)

    def load_history(self) -> None:
        """The lifecycle so far, from ClickHouse (the durable record)."""
        from services.core.clickhouse import client
        from services.core.lifecycle_store import read_lifecycle_events

        ch = client(self.settings)
        try:
            for event in read_lifecycle_events(ch):
                self.state.apply_lifecycle(event)
        finally:
            ch.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; raises RouterStopped if a request could be neither answered nor
        dead-lettered (its offset is not committed)."""
        self._stop = stop
        self.load_history()
        producer = create_producer(self.settings)
        await producer.start()
        self.publisher = Publisher(producer, self.codec)
        follow_topics = [topics.MODELS.name, topics.RETRAIN.name, topics.DATASETS.name, topics.CONTROL.name]
        follower = create_follower(self.settings, None, *follow_topics)
        requests = create_consumer(
            self.settings, GROUP, topics.REQUESTS.name, listener=_HandOver(self), max_poll_records=1000
        )
        self._requests = requests
        await follower.start()
        await requests.start()
        follow_task = asyncio.ensure_future(self._follow_lifecycle(follower))
        mark_ready(self.settings, SERVICE)
        log.info("router: serving %s (agents: %s)", topics.REQUESTS.name, ", ".join(self.agents.agents))
        last_report = time.monotonic()
        try:
            while not stop.is_set():
                batch = await requests.getmany(timeout_ms=100)
                for tp, messages in batch.items():
                    for msg in messages:
                        await self._slots.acquire()  # back-pressure: at most max_in_flight requests
                        if tp not in requests.assignment() or stop.is_set():
                            self._slots.release()  # revoked while waiting: its new owner serves it
                            continue
                        self._dispatch(msg)
                await self._commit(requests)
                if time.monotonic() - last_report > 30:
                    log.info("router: %s", dict(self.stats))
                    last_report = time.monotonic()
            # Finish what is in flight, commit it, then stop.
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await self._commit(requests)
        finally:
            clear_ready(self.settings, SERVICE)
            follow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow_task
            await requests.stop()
            await follower.stop()
            await producer.stop()
        if self._fatal is not None:
            raise RouterStopped(f"a request could be neither answered nor dead-lettered: {self._fatal}")

    async def _commit(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition] | None = None) -> None:
        """Commit what is done, for partitions this router owns; a failed commit is tried again next time."""
        owned = consumer.assignment() if partitions is None else partitions
        offsets = self._tracker.committable(owned)
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance under way, or the broker away
            log.warning("router: commit of %s failed (%s); tried again", offsets, exc)
            return
        self._tracker.committed(offsets)

    async def hand_over(self, revoked: set[TopicPartition]) -> None:
        """Partitions are going to another router: finish their requests in flight, commit them, forget them."""
        deadline = time.monotonic() + HAND_OVER_TIMEOUT_S
        while self._tracker.in_flight(revoked) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = self._tracker.in_flight(revoked)
        if left:
            log.warning("router: %d requests of revoked partitions still running; their next owner serves them", left)
        if self._requests is not None:
            await self._commit(self._requests, revoked)
        self._tracker.forget(revoked)


HAND_OVER_TIMEOUT_S = 30.0


class RouterStopped(RuntimeError):
    """The router stopped because a request could be neither answered nor dead-lettered."""


class _HandOver(ConsumerRebalanceListener):
    """Rebalances of the requests group: revoked partitions are handed over cleanly, assigned ones start fresh."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.router.hand_over(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.router._tracker.forget(assigned)
        log.info("router: serving partitions %s", sorted(tp.partition for tp in assigned))


def build_router(settings: Settings) -> Router:
    from services.teacher.base import teachers_for

    agents = load_agents(settings.agents_file)
    # Each teacher URL with its own key: the global key never goes to an agent's own teacher.url.
    teachers: dict[str, Teacher] = teachers_for(settings, [(a, c.teacher) for a, c in agents.agents.items()])
    return Router(settings, agents, teachers, StudentClient(settings.triton_grpc_url))


async def _main(settings: Settings) -> None:
    router = build_router(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await router.run(stop)
    finally:
        for teacher in router.teachers.values():
            await teacher.aclose()
        await router.student.close()
        log.info("router: stopped; %s", json.dumps(dict(router.stats)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.load()
    try:
        asyncio.run(_main(settings))
    except RouterStopped as exc:
        log.error("router: %s", exc)
        raise SystemExit(1) from None
