"""Request routers for the engine replicas (Ray Serve's request-router extension point, `RequestRouter`).

The ingress calls the engine deployment with `prefix=` the request's prompt as text (a completion prompt, token ids
joined, or the chat messages as compact JSON, so a shared system prompt is a shared prefix). Ray Serve runs the
router in the caller's process and asks `choose_replicas` for ranked candidates; among one rank it probes the
replicas' queue lengths (ongoing requests) and takes the shortest queue that is not full.

    PrefixAffinityRouter  the replica that last served the longest block-aligned prefix of this prompt, unless it
                          holds `imbalance` more ongoing requests than the least-loaded replica; else (and for a
                          prompt with no known prefix) all replicas in one rank: the least-loaded one
    RoundRobinRouter      each replica in turn (the baseline of bench/ray_scale.py)

Prefixes are counted in characters, in blocks of `block_chars` (the engine reuses whole prefill chunks of tokens;
a few characters per token make one 1024-character block about a 256-token chunk). A block is known by the hash of
everything up to its end, so one dict lookup per block finds the longest known prefix.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

BLOCK_CHARS = 256  # characters per prefix block
MIN_MATCH_BLOCKS = 2  # prefixes shorter than this many blocks do not pull a request to a replica
IMBALANCE = 8  # ongoing requests the owner may hold past the least-loaded replica before affinity gives way
MAX_BLOCKS = 100_000  # block hashes remembered (least recently used forgotten first)


def prefix_of(pending_request: PendingRequest | None) -> str:
    if pending_request is None:
        return ""
    prefix = pending_request.kwargs.get("prefix", "")
    return prefix if isinstance(prefix, str) else ""


def block_hashes(text: str, block_chars: int) -> list[bytes]:
    """The hash of each whole block-aligned prefix of text, shortest first."""
    digest, out = hashlib.blake2b(digest_size=16), []
    for end in range(block_chars, len(text) + 1, block_chars):
        digest.update(text[end - block_chars:end].encode("utf-8", "surrogatepass"))
        out.append(digest.copy().digest())
    return out


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, block_chars: int = BLOCK_CHARS, min_match_blocks: int = MIN_MATCH_BLOCKS,
                         imbalance: int = IMBALANCE, max_blocks: int = MAX_BLOCKS, **_):
        self.block_chars = block_chars
        self.min_match_blocks = min_match_blocks
        self.imbalance = imbalance
        self.max_blocks = max_blocks
        self.owners: OrderedDict[bytes, ReplicaID] = OrderedDict()  # block hash -> replica that last prefilled it

    def owner(self, hashes: list[bytes], candidates: dict) -> RunningReplica | None:
        for i in range(len(hashes) - 1, self.min_match_blocks - 2, -1):
            replica_id = self.owners.get(hashes[i])
            if replica_id is not None and replica_id in candidates:
                return candidates[replica_id]
        return None

    def load(self, replica: RunningReplica) -> int:
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if queue_len is None else queue_len

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        prefix = prefix_of(pending_request)
        hashes = block_hashes(prefix, self.block_chars) if prefix else []
        owner = self.owner(hashes, {r.replica_id: r for r in candidate_replicas}) if hashes else None
        if owner is not None:
            least = min(self.load(r) for r in candidate_replicas)
            if self.load(owner) - least <= self.imbalance:
                others = [r for r in candidate_replicas if r.replica_id != owner.replica_id]
                return [[owner], others] if others else [[owner]]
        return [random.sample(candidate_replicas, len(candidate_replicas))]  # one rank: the shortest queue wins

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        prefix = prefix_of(pending_request)
        for h in block_hashes(prefix, self.block_chars) if prefix else ():
            self.owners[h] = replica_id
            self.owners.move_to_end(h)
        while len(self.owners) > self.max_blocks:
            self.owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        for h in [h for h, r in self.owners.items() if r == replica_id]:
            del self.owners[h]


class RoundRobinRouter(RequestRouter):
    def initialize_state(self, **_):
        self.turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        first = next(self.turn) % len(ordered)
        return [[r] for r in ordered[first:] + ordered[:first]]  # the next in turn, then the others if it is full
