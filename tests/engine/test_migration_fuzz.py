"""Random interleavings of live migrations with everything else two engines do: admissions with shared
prefixes, steps that preempt (swap or recompute) under a tight pool, aborts, staged copies, pauses, commits,
cancelled and refused migrations, late copies for a cancelled reservation, migrations back to where a request
came from. Driven like deployments/migration (source.py, endpoint.py) but synchronously, so every interleaving
is reproducible from its seed.

Checked after every operation, on both engines: every slot's pages map exactly its request's chunks (the
served bug this guards against: a stale mapping made a later `grow` fail with "page N is already mapped" and
the engine loop die), the slot table is dense, the pool's chunks add up; at the end both drain and go idle."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from engine import migration
from engine.api import GenerateRequest
from engine.core.engine import LLMEngine
from engine.migration import KVStage, MigrationError
from tests.engine.engine_helpers import assert_pool_idle, greedy, tiny_engine
from tests.memory.kv_checks import assert_mappings_match_blocks

NUM_OPS = 150
MAX_MODEL_LEN = 128  # 4 pages of 32 tokens a slot: prompts of up to 90 tokens and 60 outputs reach the last one
GROWTH_MARGIN = 24  # tokens a reservation leaves for decoding during the copy (MigrationConfig.growth_margin_tokens)


@dataclass
class Flight:
    """One migration in flight, as the source's MigrationExecutor and the destination's endpoint see it."""

    request_id: str
    source: LLMEngine
    target: LLMEngine
    num_reserved: int
    num_preemptions: int
    written: int = 0
    paused: bool = False


class Fuzz:
    def __init__(self, engines: list[LLMEngine], seed: int, prompts: list[list[int]]):
        self.engines, self.random, self.prompts = engines, random.Random(seed), prompts
        self.flights: dict[str, Flight] = {}
        self.cancelled: list[Flight] = []
        self.next_id = 0
        self.log: list[str] = []

    def run(self, num_ops: int) -> None:
        ops = [self.add] * 3 + [self.step] * 6 + [self.begin] * 2 + [self.advance] * 4 + [self.abort, self.late_write]
        for _ in range(num_ops):
            self.random.choice(ops)()
            for engine in self.engines:
                check(engine)

    def drain(self) -> None:
        for flight in list(self.flights.values()):
            self.fail(flight)
        for engine in self.engines:
            while engine.has_work:
                engine.step()
                check(engine)
            assert_pool_idle(engine)

    # ---- requests ------------------------------------------------------------------------------------
    def add(self) -> None:
        engine = self.random.choice(self.engines)
        prompt = self.random.choice(self.prompts)[: self.random.randint(20, 90)]
        request_id = f"r{self.next_id}"
        self.next_id += 1
        self.log.append(f"add {request_id} ({len(prompt)} tokens) to {self.engines.index(engine)}")
        most = min(60, MAX_MODEL_LEN - len(prompt))  # some requests end at the slot's last page
        engine.add_request(GenerateRequest(request_id, tuple(prompt), greedy(self.random.randint(4, most))))

    def step(self) -> None:
        engine = self.random.choice(self.engines)
        if engine.has_work:
            self.log.append(f"step {self.engines.index(engine)}")
            for output in engine.step():
                flight = self.flights.get(output.request_id)
                if output.is_finished and flight is not None and flight.source is engine:
                    self.fail(flight)  # it finished on the source before the hand-over

    def abort(self) -> None:
        engine = self.random.choice(self.engines)
        if engine.scheduler.requests:
            request_id = self.random.choice(sorted(engine.scheduler.requests))
            self.log.append(f"abort {request_id} on {self.engines.index(engine)}")
            engine.abort(request_id)
            if request_id in self.flights and self.flights[request_id].source is engine:
                self.fail(self.flights[request_id])

    # ---- migrations ----------------------------------------------------------------------------------
    def begin(self) -> None:
        source = self.random.choice(self.engines)
        target = self.engines[1 - self.engines.index(source)]
        loads = [load for load in migration.request_loads(source)
                 if load.is_migratable and load.request_id not in self.flights]
        if not loads:
            return
        load = self.random.choice(loads)
        num_reserved = load.num_tokens + min(load.num_remaining, GROWTH_MARGIN)
        self.log.append(f"reserve {load.request_id} on {self.engines.index(target)} ({num_reserved} tokens)")
        if migration.reserve(target, load.request_id, num_reserved):
            self.flights[load.request_id] = Flight(load.request_id, source, target, num_reserved,
                                                   load.num_preemptions)

    def advance(self) -> None:
        if not self.flights:
            return
        flight = self.flights[self.random.choice(sorted(self.flights))]
        choice = self.random.random()
        try:
            if choice < 0.15:
                self.log.append(f"give up {flight.request_id}")
                self.fail(flight)
            elif choice < 0.55 and not flight.paused:
                self.copy(flight)
            else:
                self.commit(flight)
        except MigrationError as error:  # e.g. it finished, was preempted or outgrew the reservation
            self.log.append(f"migration of {flight.request_id} failed: {error}")
            self.fail(flight)

    def copy(self, flight: Flight) -> None:
        stage = migration.copy_kv(flight.source, flight.request_id, flight.written)
        self.send(flight, stage)

    def send(self, flight: Flight, stage: KVStage) -> None:
        if stage.end > flight.num_reserved:
            raise MigrationError("outgrew the reservation")
        self.log.append(f"write {flight.request_id} [{stage.start}, {stage.end})")
        migration.write_kv(flight.target, flight.request_id, stage)
        flight.written = stage.end

    def commit(self, flight: Flight) -> None:
        copy = self.random.random() < 0.8
        self.log.append(f"pause {flight.request_id} ({'copy' if copy else 'recompute'})")
        snapshot, tail = migration.pause_and_copy_tail(flight.source, flight.request_id,
                                                       flight.written if copy else None, flight.num_preemptions)
        flight.paused = True
        if snapshot.num_tokens > flight.num_reserved:
            raise MigrationError("outgrew the reservation")
        if tail is not None:
            self.send(flight, tail)
        self.log.append(f"attach {flight.request_id}")
        migration.attach(flight.target, snapshot, snapshot.num_computed_tokens if copy else 0)
        migration.release(flight.source, flight.request_id)
        del self.flights[flight.request_id]

    def fail(self, flight: Flight) -> None:
        """The roll-back: the destination frees its reservation, the source resumes a paused request."""
        self.log.append(f"cancel {flight.request_id}")
        migration.cancel(flight.target, flight.request_id)
        if flight.request_id in flight.source.scheduler.requests:
            migration.resume(flight.source, flight.request_id)
        self.flights.pop(flight.request_id, None)
        self.cancelled.append(flight)

    def late_write(self) -> None:
        """A copy that was in flight when its reservation was cancelled arrives: refused, nothing changes."""
        if not self.cancelled:
            return
        flight = self.random.choice(self.cancelled)
        if flight.request_id in flight.target.kv.requests:  # the id lives there now (e.g. migrated again)
            return
        self.log.append(f"late write {flight.request_id}")
        with pytest.raises(KeyError):
            migration.write_kv(flight.target, flight.request_id, KVStage(0, 1, []))


def check(engine: LLMEngine) -> None:
    assert_mappings_match_blocks(engine.kv)
    telemetry = engine.pool.telemetry()
    assert sum(telemetry.chunks_per_client.values()) + telemetry.num_free_chunks == telemetry.num_chunks


@pytest.fixture(scope="module")
def fuzz_prompts(smollm2_tokenizer):
    base = smollm2_tokenizer("The history of the printing press begins in the fifteenth century, when " * 3).input_ids
    return [base] + [base[:40] + smollm2_tokenizer(f" and then {word} " * 12).input_ids
                     for word in ("rivers", "bells", "ledgers")]


@pytest.mark.parametrize("preemption_mode", ["swap", "recompute"])
# two seeds in the default suite, 30 with `make test-all`
@pytest.mark.parametrize("seed", [0, 1] + [pytest.param(seed, marks=pytest.mark.slow) for seed in range(2, 30)])
def test_random_migrations_keep_every_mapping_exact(tiny_llama_dir, smollm2_tokenizer, fuzz_prompts,
                                                    preemption_mode, seed):
    # a pool of ~80 KV chunks (20 pages of 32 tokens over 4 slots): admissions preempt and reservations fail
    engines = [tiny_engine(tiny_llama_dir, smollm2_tokenizer, max_num_seqs=4, preemption_mode=preemption_mode,
                           max_model_len=MAX_MODEL_LEN,
                           device_memory_bytes=25_505_792 + 200 * 4096, host_buffer_bytes=4 << 20)
               for _ in range(2)]
    fuzz = Fuzz(engines, seed, fuzz_prompts)
    try:
        fuzz.run(NUM_OPS)
        fuzz.drain()
    except BaseException:
        print("\n".join(fuzz.log[-40:]))
        raise
    finally:
        for engine in engines:
            engine.close()
