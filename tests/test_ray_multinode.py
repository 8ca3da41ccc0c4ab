"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`): placement, sharding, node loss.

Each node is its own raylet with 1 CPU and a custom resource (``{"node_a": 1}``...), so a consumer
actor (standing in for a Ray Train worker) can be put on a chosen node; its loader actor must land
next to it.

What losing a node does (tested below): the loader actor on that node cannot come back — it is
pinned to its consumer's node (hard node affinity), and that node is gone — and neither can the
consumer, which lived there too. A consumer of a lost loader actor gets `ActorUnschedulableError`
(or `ActorDiedError`) with a note saying what happened and how to recover; ranks on other nodes
carry on unaffected; and a restart from the last state (what Ray Train does with
``FailureConfig(max_failures=...)``), with however many workers remain, finishes the epoch exactly once.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from ray_extsrc import pipeline_def  # noqa: E402
from conftest import assert_no_segments_of  # noqa: E402
from ray_extsrc.pipeline import external_source  # noqa: E402
from ray_extsrc.train import Loader  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable in workers

pytestmark = [pytest.mark.timeout(60), pytest.mark.allow_children]

N, B = 61, 4  # 15 full batches: 7 per rank for 2 ranks


class IndexSource:
    def __len__(self) -> int:
        return N

    def __call__(self, info):
        if info.iteration >= N // B:
            raise StopIteration
        time.sleep(0.002)
        return np.int64([info.idx_in_epoch])


@pipeline_def(batch_size=B, num_threads=1, py_num_workers=1)
def pipeline():
    return external_source(source=IndexSource(), batch=False, parallel=True)


@ray.remote(num_cpus=0)
class Consumer:
    """Stands in for a Ray Train worker: reads its shard through the public iterator."""

    def start(self, loader, rank, world_size, state=None):
        self.it = loader.iter_torch_batches(state=state, rank=rank, world_size=world_size)
        self.gen = None
        d = self.it.describe()
        here = ray.get_runtime_context().get_node_id()
        return {"node_id": here, "actor_node_id": d["node_id"], "actor_pid": d["pid"]}

    def take(self, k):
        if self.gen is None:
            self.gen = iter(self.it)
        return [next(self.gen)[0].ravel().tolist() for _ in range(k)]

    def rest(self):
        if self.gen is None:
            self.gen = iter(self.it)
        out = [b[0].ravel().tolist() for b in self.gen]
        self.gen = None
        return out

    def state(self):
        return self.it.state_dict()

    def close(self):
        if self.gen is not None:
            self.gen.close()
        self.it.close()
        return self.it.actor_pids


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {name: c.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")}
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def node_id_of(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def consumer_on(resource: str):
    return Consumer.options(resources={resource: 0.01}).remote()


def test_each_loader_actor_runs_on_its_consumers_node_and_shards_hold_across_nodes(cluster):
    loader = Loader(pipeline, last_batch_policy="drop")  # its source ends at N // B full batches
    consumers = [consumer_on("node_a"), consumer_on("node_b")]
    infos = ray.get([c.start.remote(loader, r, 2) for r, c in enumerate(consumers)])
    try:
        assert infos[0]["node_id"] == node_id_of("node_a") and infos[1]["node_id"] == node_id_of("node_b")
        for info in infos:
            assert info["actor_node_id"] == info["node_id"]
        for _ in range(2):
            per_rank = ray.get([c.rest.remote() for c in consumers])
            assert [len(b) for b in per_rank] == [7, 7]
            for r, batches in enumerate(per_rank):
                assert batches == [list(range((2 * i + r) * B, (2 * i + r + 1) * B)) for i in range(7)]
    finally:
        pids = [p for c in consumers for p in ray.get(c.close.remote())]
    assert_no_segments_of(pids)


def test_losing_a_node_fails_its_rank_clearly_and_a_restart_finishes_the_epoch_exactly_once(cluster):
    c, _ = cluster
    doomed = c.add_node(num_cpus=1, resources={"node_c": 1})
    c.wait_for_nodes()
    loader = Loader(pipeline, last_batch_policy="drop")
    survivor, victim = consumer_on("node_a"), consumer_on("node_c")
    infos = ray.get([survivor.start.remote(loader, 0, 2), victim.start.remote(loader, 1, 2)])
    # A loader whose actor is on the doomed node while its consumer (this driver) is not, to see
    # the iterator's own error (placing it there takes overriding the scheduling strategy).
    on_doomed = NodeAffinitySchedulingStrategy(node_id_of("node_c"), soft=False)
    stray = Loader(pipeline, last_batch_policy="drop", actor_options={"scheduling_strategy": on_doomed})
    stray_it = stray.iter_torch_batches(rank=0, world_size=1)
    stray_gen = iter(stray_it)
    next(stray_gen)
    stray_pid = stray_it.describe()["pid"]
    seen = [i for b in ray.get(survivor.take.remote(3)) + ray.get(victim.take.remote(3)) for i in b]
    state = ray.get(survivor.state.remote())  # the ranks are in step: the checkpoint of a real run
    assert state["consumed_batches"] == 6

    c.remove_node(doomed)

    with pytest.raises(ray.exceptions.RayActorError):  # the consumer died with its node
        ray.get(victim.take.remote(1))
    with pytest.raises((ray.exceptions.ActorUnschedulableError, ray.exceptions.ActorDiedError)) as info:
        for _ in range(N // B):  # batches already delivered before the loss are still served
            next(stray_gen)
    assert any("cannot be restarted" in n and "FailureConfig" in n for n in info.value.__notes__)
    stray_it.close()
    # the rank on the surviving node is not affected
    assert ray.get(survivor.take.remote(2)) == [list(range(g * B, (g + 1) * B)) for g in (6, 8)]
    survivor_pids = ray.get(survivor.close.remote())

    # What Ray Train does next: a new worker group (here one worker, on node_a) resumes from the state.
    restarted = consumer_on("node_a")
    ray.get(restarted.start.remote(loader, 0, 1, state))
    rest = ray.get(restarted.rest.remote())
    assert len(rest) == 15 - 6
    seen += [i for b in rest for i in b]
    assert sorted(seen) == list(range(15 * B))
    pids = survivor_pids + ray.get(restarted.close.remote()) + [infos[1]["actor_pid"], stray_pid]
    assert_no_segments_of(pids)  # including the lost node's actors: their janitors unlinked them
