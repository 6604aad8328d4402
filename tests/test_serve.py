"""The translation server, through a real HTTP client against a server listening on 127.0.0.1."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from seq2seq import Translator, compose, inference, serve
from seq2seq.errors import ConfigError, DataError
from seq2seq.guides import Term
from seq2seq.serve import Batcher, Limits, background, create_app
from seq2seq.testing import build, fit

SOURCES = ["1 2 3", "4 5 6 7", "8 9", "3 1 4 1 5", "2 7 1 8 2 8", "9 9 9"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    module, pairs = build(["experiment=reverse", "model.d_model=32", "model.d_ff=64"], 64)
    fit(module, pairs, 30, root).save_checkpoint(root / "model.ckpt")
    return root / "model.ckpt", Translator(module)


def test_translations_come_back_as_the_translator_gives_them(trained):
    _, translator = trained
    with background(translator) as (_, url), httpx.Client(base_url=url) as client:
        health = client.get("/health").json()
        assert health == {"status": "ok", "backend": "eager", "queued": 0, "max_queue": 256}
        reply = client.post("/translate", json={"text": SOURCES})
        assert reply.status_code == 200
        assert reply.json() == {"translations": translator.translate(SOURCES), "backend": "eager"}
        assert client.post("/translate", json={"text": SOURCES[0]}).json()["translations"] == \
            translator.translate(SOURCES[:1])
        best = client.post("/translate", json={"text": SOURCES[:2], "beam": 4, "n_best": 3}).json()["translations"]
        expected = translator.with_decoding(beam=4).n_best(SOURCES[:2], 3)
        assert [[h["text"] for h in hyps] for hyps in best] == [[t for _, t in hyps] for hyps in expected]
        assert [h["score"] for hyps in best for h in hyps] == pytest.approx([s for hyps in expected for s, _ in hyps])
        # Prefixes and constraints, one entry per source; a request without them shares the batch unchanged.
        steer = {"text": SOURCES[:3], "beam": 3, "prefix": ["9 9", None, None], "include": [[], ["5 5"], []],
                 "exclude": [[], [], ["9"]]}
        guided = client.post("/translate", json=steer).json()["translations"]
        beam = translator.with_decoding(beam=3)
        assert guided == beam.translate(SOURCES[:3], beam.guides(3, steer["prefix"], steer["include"],
                                                                 steer["exclude"]))
        assert guided[0].startswith("9 9") and "5 5" in guided[1] and "9" not in guided[2].split()
        one = client.post("/translate", json={"text": SOURCES[0], "prefix": "7"}).json()["translations"]
        assert one == translator.translate(SOURCES[:1], translator.guides(1, ["7"])) and one[0].startswith("7")


def test_a_glossary_constrains_the_sources_that_contain_a_source_term(trained):
    _, translator = trained
    beam = translator.with_decoding(beam=3)
    glossary = [Term("3", "6 6")]  # a target term a reversal of these sources never holds
    with background(beam, glossary=glossary) as (_, url), httpx.Client(base_url=url) as client:
        reply = client.post("/translate", json={"text": SOURCES, "include": [[], ["5 5"], [], ["6 6"], [], []]})
        steered = reply.json()["translations"]
    # "3" is in sources 0 and 3; source 3 asked for the term itself, and source 1 for a phrase of its own
    include = [["6 6"], ["5 5"], [], ["6 6"], [], []]
    assert steered == beam.translate(SOURCES, beam.guides(len(SOURCES), include=include))
    plain = beam.translate(SOURCES)
    assert all("6 6" not in out for out in plain)
    assert "6 6" in steered[0] and "6 6" in steered[3] and "5 5" in steered[1]
    assert [steered[i] for i in (2, 4, 5)] == [plain[i] for i in (2, 4, 5)]  # no term: unchanged


def test_a_glossary_target_term_the_model_cannot_spell_is_refused_at_startup(trained):
    _, translator = trained
    with pytest.raises(DataError, match=r"glossary term 2 \('4' -> '4 x'\): .*symbol 'x'"):
        create_app(translator, glossary=[Term("3", "6 6"), Term("4", "4 x")])


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_translate_and_evaluate_refuse_such_a_term_before_decoding(trained, tmp_path, command):
    ckpt, _ = trained
    (tmp_path / "terms.tsv").write_text("3\t6 6\n4\t4 x\n")
    (tmp_path / "in.txt").write_text("1 2 3\n")  # no input holds the bad term's source
    extra = [f"input={tmp_path / 'in.txt'}", f"output={tmp_path / 'out.txt'}"] if command == "translate" else []
    config = compose([f"ckpt={ckpt}", f"glossary={tmp_path / 'terms.tsv'}", *extra], command=command)
    with pytest.raises(DataError, match=r"^glossary term 2 \('4' -> '4 x'\): .*symbol 'x'"):
        getattr(inference, command)(config)
    assert not (tmp_path / "out.txt").exists()


BAD = [
    ({"text": []}, 422, '"text" is empty'),
    ({"text": ["1 2", " "]}, 422, '"text"[1] is empty'),
    ({"text": 3}, 422, '"text" must be a string or a list of strings'),
    ({"text": ["1", 2]}, 422, '"text" must be a string or a list of strings'),
    ({"txt": "1 2"}, 422, "unknown field(s) ['txt']"),
    ({"beam": 2}, 422, 'missing "text"'),
    ({"text": "1 2", "beam": 0}, 422, '"beam" must be an integer from 1 to 64, got 0'),
    ({"text": "1 2", "n_best": "2"}, 422, '"n_best" must be an integer'),
    ({"text": ["1"] * 9}, 413, '"text" has 9 sources; at most 8 per request'),
    ({"text": "1 " * 40}, 413, '"text"[0] has 80 characters; at most 60'),
    ({"text": "1 x 2"}, 422, "symbol 'x' in '1 x 2' is not in the vocabulary"),
    ({"text": " ".join(["1"] * 29)}, 422, "longer than the model's 28 positions"),
    ([1, 2], 422, "the body must be a JSON object"),
    ({"text": ["1", "2"], "prefix": ["3"]}, 422, '"prefix" must have one entry per source (2), in a list'),
    ({"text": "1 2", "include": "3"}, 422, '"include" must be a list of non-empty strings, got \'3\''),
    ({"text": ["1"], "exclude": [[""]]}, 422, '"exclude"[0] must be a list of non-empty strings'),
    ({"text": "1 2", "prefix": 3}, 422, '"prefix" must be a string or null, got 3'),
    ({"text": ["1"] * 8, "beam": 8, "n_best": 2}, 413, "8 sources × beam 8 × n_best 2 = 128 hypotheses; at most 100"),
    ({"text": "1 2", "include": [" ".join(["5"] * 30)]}, 422, "include phrases take 30 target tokens, and this model "
                                                              "writes at most 27"),
]


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving():
    module, _ = build(["experiment=reverse", "model.d_model=32", "model.d_ff=64", "model.max_positions=28"])
    translator = Translator(module)
    limits = Limits(max_inputs=8, max_chars=60, max_body=2000, max_work=100)
    with background(translator, limits) as (_, url), httpx.Client(base_url=url) as client:
        for body, status, message in BAD:
            reply = client.post("/translate", json=body)
            assert (reply.status_code, message in reply.json()["error"]) == (status, True), (body, reply.text)
        reply = client.post("/translate", content=b'{"text": ["abc \\ud800"]}')  # JSON's escape, no Unicode
        assert reply.status_code == 422 and "lone surrogate" in reply.json()["error"]
        reply = client.post("/translate", content=b'{"text": ["1 2"')
        assert reply.status_code == 400 and "not JSON" in reply.json()["error"]
        reply = client.post("/translate", content=b'{"text": "' + b"1 " * 1500 + b'"}')
        assert reply.status_code == 413 and "over 2000 bytes" in reply.json()["error"]
        assert client.post("/translate", json={"text": SOURCES[:2]}).json()["translations"] == \
            translator.translate(SOURCES[:2])


def test_concurrent_requests_are_batched_and_every_one_is_answered(trained, monkeypatch):
    _, translator = trained
    batches = []
    decode = Batcher._decode

    def counted(self, beam, n_best, sources, guides):
        batches.append(len(sources))
        return decode(self, beam, n_best, sources, guides)

    monkeypatch.setattr(Batcher, "_decode", counted)
    requests = [SOURCES[i % len(SOURCES)] for i in range(48)]

    async def send_all(url):
        async with httpx.AsyncClient(base_url=url) as client:
            return await asyncio.gather(*[client.post("/translate", json={"text": [s]}) for s in requests])

    with background(translator, Limits(max_batch=16, max_wait_ms=50)) as (_, url):
        replies = asyncio.run(send_all(url))
    assert [r.json()["translations"][0] for r in replies] == translator.translate(requests)
    assert sum(batches) == 48 and max(batches) <= 16 and len(batches) < 48  # shared batches, within the limit


def test_shutdown_answers_the_requests_in_flight(trained, monkeypatch):
    _, translator = trained
    started = threading.Event()
    decode = Batcher._decode

    def slow(self, beam, n_best, sources, guides):
        started.set()
        time.sleep(1.0)
        return decode(self, beam, n_best, sources, guides)

    monkeypatch.setattr(Batcher, "_decode", slow)
    replies = []
    with background(translator) as (server, url):
        sender = threading.Thread(target=lambda: replies.append(httpx.post(f"{url}/translate",
                                                                            json={"text": SOURCES}, timeout=30)))
        sender.start()
        assert started.wait(10)
        server.should_exit = True  # what uvicorn's SIGTERM handler does
        sender.join()
    assert replies[0].status_code == 200 and replies[0].json()["translations"] == translator.translate(SOURCES)


def test_a_cancelled_request_does_not_stop_the_batcher(trained):
    _, translator = trained

    async def scenario():
        batcher = Batcher(translator, Limits(max_wait_ms=50))
        worker = asyncio.create_task(batcher.run())
        gone = batcher.submit(SOURCES[:1], None, 1)
        await asyncio.sleep(0.01)
        gone.cancel()  # its client went away while it waited for a batch
        answer = await asyncio.wait_for(batcher.submit(SOURCES[1:2], None, 1), 30)
        worker.cancel()
        return answer

    assert asyncio.run(scenario()) == translator.translate(SOURCES[1:2])


@pytest.mark.slow
def test_seq2seq_serve_runs_until_sigterm_and_shuts_down_cleanly(trained, tmp_path):
    ckpt, translator = trained
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "seq2seq", "serve", f"ckpt={ckpt}", f"port={port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        reply = httpx.post(f"{url}/translate", json={"text": SOURCES})
        assert reply.json()["translations"] == translator.translate(SOURCES)
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    # uvicorn finishes its shutdown, then re-raises the signal it caught: the process ends as SIGTERM says
    assert server.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out[-2000:]


def _slow(monkeypatch, seconds, decoded=None, fail_on=None):
    """Batcher._decode that waits first, records what it decodes, and fails on a batch holding `fail_on`."""
    decode = Batcher._decode

    def slow(self, beam, n_best, sources, guides):
        time.sleep(seconds)
        if decoded is not None:
            decoded.extend(sources)
        if fail_on in sources:
            raise RuntimeError("this source breaks the search")
        return decode(self, beam, n_best, sources, guides)

    monkeypatch.setattr(Batcher, "_decode", slow)


def test_a_request_that_fails_its_batch_fails_alone(trained, monkeypatch):
    _, translator = trained
    _slow(monkeypatch, 0.0, fail_on="9 9 9")
    texts = [*SOURCES[:5], "9 9 9", *SOURCES[:3]]

    async def send_all(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/translate", json={"text": [t]}) for t in texts])

    with background(translator, Limits(max_batch=16, max_wait_ms=200)) as (_, url):
        replies = asyncio.run(send_all(url))
    assert [r.status_code for r in replies] == [200] * 5 + [500] + [200] * 3
    # all shared one batch, which failed; then each was decoded alone
    assert [r.json()["translations"] for r in replies if r.status_code == 200] == [
        translator.translate([t]) for t in texts if t != "9 9 9"]
    assert "this source breaks the search" in replies[5].json()["error"]


def test_a_full_queue_answers_503_with_retry_after_then_recovers(trained, monkeypatch):
    _, translator = trained
    _slow(monkeypatch, 0.5)

    async def flood(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/translate", json={"text": SOURCES[:2]}) for _ in range(8)])

    with background(translator, Limits(max_batch=2, max_wait_ms=0, max_queue=4)) as (_, url):
        replies = asyncio.run(flood(url))
        codes = sorted(r.status_code for r in replies)
        busy = [r for r in replies if r.status_code == 503]
        after = httpx.post(f"{url}/translate", json={"text": SOURCES[:2]}, timeout=60)
        health = httpx.get(f"{url}/health").json()
    assert codes.count(200) >= 2 and codes.count(503) >= 4 and set(codes) == {200, 503}
    assert busy[0].headers["retry-after"] == "1" and "at most 4" in busy[0].json()["error"]
    assert after.status_code == 200 and health["queued"] == 0 and health["max_queue"] == 4


def test_the_work_of_a_client_that_disconnected_is_dropped(trained, monkeypatch):
    _, translator = trained
    decoded = []
    _slow(monkeypatch, 2.0, decoded)
    with background(translator, Limits(max_batch=2, max_wait_ms=0)) as (_, url):
        first = threading.Thread(target=lambda: httpx.post(f"{url}/translate", json={"text": ["1 2 3"]}, timeout=60))
        first.start()  # occupies the decoder for two seconds
        time.sleep(0.3)
        with pytest.raises(httpx.ReadTimeout):  # this client gives up while its request waits in the queue
            httpx.post(f"{url}/translate", json={"text": ["4 5 6 7"]}, timeout=0.3)
        for _ in range(50):  # its sources leave the count at once, while the first request still decodes
            if (queued := httpx.get(f"{url}/health").json()["queued"]) == 1:
                break
            time.sleep(0.02)
        assert queued == 1 and first.is_alive()
        first.join()
        time.sleep(0.5)
        assert httpx.post(f"{url}/translate", json={"text": ["8 9"]}, timeout=60).status_code == 200
        assert httpx.get(f"{url}/health").json()["queued"] == 0
    assert decoded == ["1 2 3", "8 9"]  # never "4 5 6 7"


def test_an_address_that_cannot_be_served_is_refused_before_serving(trained):
    ckpt, translator = trained
    with pytest.raises(ConfigError, match=r"`port` must be at most 65535, got 99999"):
        compose([f"ckpt={ckpt}", "port=99999"], "serve")
    with background(translator) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}: Address already in use"):
            serve.run(translator, Limits(), "127.0.0.1", port)
    with pytest.raises(ConfigError, match=r"`host=no-such-host.invalid` cannot be resolved"):
        serve.run(translator, Limits(), "no-such-host.invalid", 0)


def test_a_request_larger_than_a_batch_is_decoded_in_batches_and_stops_when_its_client_leaves(trained, monkeypatch):
    _, translator = trained
    decoded = []
    _slow(monkeypatch, 0.5, decoded)
    with background(translator, Limits(max_batch=2, max_wait_ms=0)) as (_, url):
        with pytest.raises(httpx.ReadTimeout):  # six sources, three batches of two; the client leaves in the first
            httpx.post(f"{url}/translate", json={"text": SOURCES}, timeout=0.3)
        time.sleep(1.5)
        assert httpx.get(f"{url}/health").json()["queued"] == 0
    assert decoded == SOURCES[:2]  # the batch under way finished; the other two were never started
