"""`seekwen serve --speculative ngram [--paged]`: the server speculates (n-gram prompt lookup), on the row-pool
or the paged engine, as a real process on a
loopback port driven by the official client: greedy text, streamed or not, equals the model's own greedy
generation; /metrics counts the drafted and accepted tokens; bad flag combinations fail at start."""

from __future__ import annotations

import subprocess
import sys

import pytest
from serve_util import greedy_reference, http, metric, serving

from seekwen.tools.common import bundled_model_path

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not (bundled_model_path() / "model.safetensors").is_file(),
                                reason="bundled model not built")

NAME = "kjv"
VERSE = "And God said, Let there be light: and there was light. And God saw the light, that it was good. "
PROMPTS = [VERSE * 2 + "And God said", VERSE + "And God saw", "In the beginning God created"]
N = 20


@pytest.fixture(scope="module", params=["rows", "paged"])
def server(request, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-spec") / "server.log"
    paged = ["--paged"] if request.param == "paged" else ["--engine", "rows"]
    with serving("--served-model-name", NAME, "--speculative", "ngram", "--num-speculative-tokens", "4",
                 "--max-batch", "3", *paged, log=log) as srv:
        yield srv


def test_speculating_server_greedy_equals_generate(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    kw = dict(model=NAME, temperature=0, max_tokens=N, extra_body={"ignore_eos": True})
    texts = [client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt=PROMPTS[0], stream=True, **kw))
    refs = [greedy_reference(server, NAME, p, N) for p in PROMPTS]
    assert texts == refs and streamed == refs[0]
    text = http(server.url + "/metrics")[1].decode()
    drafted = metric(text, "seekwen_spec_decode_num_draft_tokens_total")
    accepted = metric(text, "seekwen_spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted <= drafted  # the repeated verse is found and accepted


@pytest.mark.parametrize("args, message", [
    (["--speculative", "mtp", "--paged"], "ngram only"),
    (["--speculative", "draft"], "--draft-model"),
    (["--draft-model", "x"], "only used with --speculative draft"),
])
def test_speculation_flag_errors(args, message):
    r = subprocess.run([sys.executable, "-m", "seekwen", "serve", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr
