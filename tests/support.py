"""Helpers shared by test modules (which never import each other): the `fedaug` command as a real process, a free
loopback port and a stand-in gRPC health server, a small simulation config that trains in seconds, a tiny sentence
encoder and a small Amazon-style set with item texts."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp import Grid

ROOT = Path(__file__).resolve().parents[1]
BEAUTY_DIR = ROOT.parent / "shared" / "data" / "amazon-beauty"
"""Where the workspace keeps Amazon Beauty (Beauty.txt and, where present, the raw 2014 files)."""


def setup_folders() -> tuple[str, ...]:
    """setup.py's FOLDERS, read from its source: the one list of the folders that install as fedaug.<folder>."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and [target.id for target in node.targets if isinstance(target, ast.Name)] == ["FOLDERS"])


SMALL = """
[synthetic]
users = 400
items = 300
merchants = 3
titles = false  # item ids alone: these tests are about training; the main job's test has titles
[model]
hidden = 16
heads = 2
max_len = 20
[simulation]
merchants = 3
[local]
batch_size = 64
"""


LIBRARY_NOTES = ("Secure RNG", "Optimal order", "Full backward hook", "FutureWarning", "UserWarning",
                 "PrivacyPlanWarning", "sampling rate of", "Loading weights", "Batches", "%|", "warnings.warn(")
"""Warnings and progress bars that once reached users' terminals and logs from Opacus, torch, Ray, transformers and
our own privacy plan (tests/test_quiet.py): none of them may appear in what a user runs."""


def fedaug(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m fedaug ARGS` from the repository root, in its own process group (so a test can kill it all)."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedaug", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def run_fedaug(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m fedaug ARGS` run to its end from ``cwd``, its output captured as text; ``env`` adds to the
    environment. Past ``timeout`` seconds the test fails (subprocess.TimeoutExpired)."""
    return subprocess.run([sys.executable, "-m", "fedaug", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=None if env is None else os.environ | env)


def finish(process: subprocess.Popen, timeout: float) -> str:
    """Its output once it exits; the test fails (and the group is killed) past ``timeout`` seconds."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"fedaug {' '.join(process.args[3:5])} did not finish in {timeout:.0f} s:\n{output[-3000:]}")
    return output


WORDS = "red blue green nail polish lipstick shampoo hair oil brand".split()


def tiny_encoder(directory: Path) -> Path:
    """A 16-wide, one-layer BERT sentence encoder with a word-level vocabulary, saved like any ST model."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import modules as st_models
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models as st_models
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64))
    bert.save_pretrained(directory / "hf")
    fast.save_pretrained(directory / "hf")
    model = SentenceTransformer(modules=[st_models.Transformer(str(directory / "hf"), max_seq_length=32),
                                         st_models.Pooling(16, "mean")])
    model.save(str(directory / "encoder"))
    return directory / "encoder"


def write_amazon_set(directory: Path) -> Path:
    """Six items in two colour families; users move within a family, so the last item's text predicts the next."""
    rng = np.random.default_rng(0)
    lines = []
    for user in range(1, 61):
        family = [1, 2, 3] if user % 2 else [4, 5, 6]
        lines.append(" ".join(map(str, [user, *rng.choice(family, size=6)])))
    (directory / "Shop.txt").write_text("\n".join(lines) + "\n")
    titles = ["red nail polish", "red lipstick", "red hair oil", "blue shampoo", "blue nail polish", "blue hair oil"]
    (directory / "Shop_item_titles.tsv").write_text(
        "item_id\tasin\ttitle\n" + "".join(f"{i}\tA{i}\t{t}\n" for i, t in enumerate(titles, start=1)))
    (directory / "Shop_item_attributes_named.tsv").write_text(
        "item_id\tasin\tattributes\n" + "".join(f"{i}\tA{i}\tbrand|{'red' if i < 4 else 'blue'}\n"
                                                for i in range(1, 7)))
    return directory / "Shop.txt"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def health_server():
    """A stand-in for Flower's gRPC health service on a free loopback port: yields (port, set_serving), where
    set_serving(bool) sets what it answers."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    status = health_pb2.HealthCheckResponse
    try:
        yield port, lambda serving: servicer.set("", status.SERVING if serving else status.NOT_SERVING)
    finally:
        server.stop(None)


def model_config(n_items: int, n_attributes: int = 0, **settings):
    """A SASRec config from [model] settings (fedaug.common.config.ModelSection, where the defaults are) for
    ``n_items`` items: the plain model unless ``settings`` say otherwise (no tied item tables, no behaviour or time
    vectors), with catalog attributes where ``n_attributes`` is given."""
    from fedaug.common.config import ModelSection
    from fedaug.common.model.sasrec import SASRecConfig

    plain = {"tie_embeddings": False, "behaviour": False, "time_context": False, "catalog": n_attributes > 0}
    return SASRecConfig.from_section(ModelSection(**(plain | settings)), n_items, n_attributes)



class OfflineGrid(Grid):
    """A Flower Grid with ``nodes`` connected and no transport: what Flower's strategies call to send raises, so a
    test subclasses it (``send_and_receive``) or uses it where only the node ids are asked for."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def set_run(self, run):  # noqa: D102
        pass

    @property
    def run(self):  # noqa: D102
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self):  # noqa: D102
        return list(self.nodes)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        raise NotImplementedError
