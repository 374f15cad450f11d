"""`septet serve`: the OpenAI-compatible API answers what `septet.generate` computes, streams
the same text in pieces, and refuses bad requests with HTTP 400 naming the field; the
official `openai` client (an independent reading of the API) talks to it."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request

import pytest

from septet.api import LoadedModel
from septet.serve import SeptetServer


@pytest.fixture(scope="module")
def lm(chat_lm) -> LoadedModel:
    return chat_lm


@pytest.fixture(scope="module")
def server(lm):
    srv = SeptetServer(lm, "127.0.0.1", 0, verbose=False)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(server, path: str, body, raw: bool = False) -> tuple[int, bytes]:
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def events(payload: bytes) -> list:
    out = []
    for block in payload.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completion_is_what_generate_computes(server, lm):
    status, body = post(server, "/v1/completions", {"prompt": "To be, or not", "max_tokens": 12, "temperature": 0})
    assert status == 200
    r = json.loads(body)
    assert r["object"] == "text_completion" and r["model"] == "tiny"
    assert r["choices"][0]["text"] == lm.generate("To be, or not", max_new_tokens=12, temperature=0)
    assert r["usage"]["prompt_tokens"] == len(lm.encode("To be, or not"))
    if r["choices"][0]["finish_reason"] == "length":
        assert r["usage"]["completion_tokens"] == 12


def test_stream_sends_the_same_text_in_pieces(server):
    body = {"prompt": "My lord", "max_tokens": 10, "temperature": 0}
    whole = json.loads(post(server, "/v1/completions", body)[1])
    status, payload = post(server, "/v1/completions", {**body, "stream": True})
    ev = events(payload)
    assert status == 200 and ev[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == whole["choices"][0]["text"]
    assert ev[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert ev[-2]["usage"] == whole["usage"]


def test_a_stop_string_ends_the_text(server):
    free = json.loads(post(server, "/v1/completions", {"prompt": "the king", "max_tokens": 20,
                                                       "temperature": 0})[1])["choices"][0]["text"]
    stop = free.strip()[:3]
    assert stop
    r = json.loads(post(server, "/v1/completions", {"prompt": "the king", "max_tokens": 20, "temperature": 0,
                                                    "stop": [stop]})[1])
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == free[:free.index(stop)]


@pytest.mark.parametrize("body,field", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 160}, "context of 160"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "n": 2}, "'n' is not supported"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, payload = post(server, path, body)
    assert status == 400
    assert field in json.loads(payload)["error"]["message"]


def test_bad_json_unknown_routes_and_huge_bodies(server):
    status, payload = post(server, "/v1/completions", b"{not json", raw=True)
    assert status == 400 and "not valid JSON" in json.loads(payload)["error"]["message"]
    assert post(server, "/v1/embeddings", {})[0] == 404
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(10 << 20))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def test_a_client_leaving_mid_stream_frees_the_server(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    body = json.dumps({"prompt": "Hamlet", "max_tokens": 100, "stream": True, "temperature": 1.0}).encode()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read1(64)
    conn.close()  # gone after the first event
    results = []

    def ask():
        results.append(post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3})[0])

    threads = [threading.Thread(target=ask) for _ in range(2)]  # also: two at once, one lock
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200, 200]


def test_the_openai_client_talks_to_it(server, lm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is the king?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 12
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                             stream=True)]
    assert "".join(pieces) == text
    c = client.completions.create(model="tiny", prompt="To be", max_tokens=5, temperature=0)
    assert c.choices[0].text == lm.generate("To be", max_new_tokens=5, temperature=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="To be", max_tokens=10_000)


def test_the_chat_page_is_served(server):
    with urllib.request.urlopen(server.url + "/", timeout=30) as r:
        page = r.read().decode()
    assert "/v1/chat/completions" in page and "tiny" in page and "textContent" in page
    with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["model"] == "tiny" and health["requests"] >= health["batches"] > 0


def test_a_failing_generation_is_a_500_and_the_server_keeps_serving(server, monkeypatch):
    from septet.serve import scheduler

    def boom(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(scheduler.Scheduler, "_emit", staticmethod(boom))
    status, payload = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert status == 500 and "RuntimeError: kernel exploded" in json.loads(payload)["error"]["message"]
    status, payload = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True})
    assert status == 200 and "kernel exploded" in events(payload)[-1]["error"]["message"]
    monkeypatch.undo()
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3})[0] == 200


def test_requests_decoded_together_get_what_each_gets_alone(lm):
    """The batch path itself (run synchronously): rows of different lengths, budgets and
    stop strings, one row dropped when its client leaves; every other row's text is the one
    `septet.generate` gives for that prompt alone."""
    from septet.inference import Sampling
    from septet.serve.openai import Request
    from septet.serve.scheduler import Job, Scheduler

    scheduler = Scheduler(lm)  # its worker idles on the empty queue; the batch runs here
    prompts = ["To be, or not to be", "My lord", "What is the king doing in the garden today", "O"]
    budgets = [12, 5, 9, 12]
    jobs = [Job(Request(lm.prompt_ids(p), Sampling(max_new_tokens=n, temperature=0), (), False, False))
            for p, n in zip(prompts, budgets)]
    alone_free = lm.generate(prompts[3], max_new_tokens=12, temperature=0)
    stop = alone_free.strip()[:2]
    jobs[3].req.stop = (stop,)
    gone = Job(Request(lm.prompt_ids("Hamlet"), Sampling(max_new_tokens=12, temperature=0), (), False, False))
    gone.close()
    scheduler._serve(jobs + [gone])
    for job, p, n in zip(jobs[:3], prompts, budgets):
        assert "".join(job) == lm.generate(p, max_new_tokens=n, temperature=0), p
        assert job.finish_reason in ("length", "stop")
    assert "".join(jobs[3]) == alone_free[:alone_free.index(stop)] and jobs[3].finish_reason == "stop"
    assert gone.completion_tokens == 1  # dropped after its first token


def test_the_chat_page_script_is_valid_javascript(tmp_path):
    import shutil
    import subprocess

    from septet.serve.page import PAGE

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot check the page's script")
    script = tmp_path / "page.js"
    script.write_text(PAGE.split("<script>")[1].split("</script>")[0])
    r = subprocess.run([node, "--check", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_an_unasked_budget_fits_the_context(server, lm):
    """Chat's default budget (256) is more than this model's context (160): without
    max_tokens the answer may run to the context's end; a prompt that fills it is refused."""
    status, body = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak"}]})
    assert status == 200
    usage = json.loads(body)["usage"]
    assert usage["total_tokens"] <= 160
    status, body = post(server, "/v1/completions", {"prompt": "Denmark " * 200})
    assert status == 400 and "context of 160" in json.loads(body)["error"]["message"]


def test_a_request_arriving_mid_batch_joins_it_and_gets_what_it_gets_alone(lm):
    from septet.inference import Sampling
    from septet.serve.openai import Request
    from septet.serve.scheduler import Job, Scheduler

    def job(prompt: str, n: int) -> Job:
        return Job(Request(lm.prompt_ids(prompt), Sampling(max_new_tokens=n, temperature=0), (), False, False))

    scheduler = Scheduler(lm)  # its worker idles on the empty queue; the batch runs here
    first = job("What is the king doing in the garden today", 6)
    late = job("My lord", 20)  # shorter than the batch's history: joins, and needs more slots
    too_long = job("O " * 40, 4)  # longer than the history when it arrives: waits for the next batch
    scheduler._waiting += [late, too_long]
    scheduler._serve([first])
    assert scheduler.stats["joined"] == 1 and scheduler._waiting == [too_long]
    assert "".join(first) == lm.generate("What is the king doing in the garden today", max_new_tokens=6,
                                         temperature=0)
    assert "".join(late) == lm.generate("My lord", max_new_tokens=20, temperature=0)


def test_omitted_sampling_fields_take_the_models_defaults(lm, monkeypatch):
    from septet.serve.openai import parse_chat, parse_completion

    chat = {"messages": [{"role": "user", "content": "Speak"}]}
    s = parse_chat(chat, lm).sampling
    assert (s.temperature, s.top_p) == (1.0, 1.0)  # no model defaults: the OpenAI API's
    monkeypatch.setattr(lm, "generation_defaults", {"temperature": 0.2, "top_p": 0.9}, raising=False)
    s = parse_chat(chat, lm).sampling
    assert (s.temperature, s.top_p) == (0.2, 0.9)
    s = parse_chat({**chat, "temperature": None}, lm).sampling
    assert s.temperature == 0.2  # null is "not given"
    s = parse_completion({"prompt": "x", "temperature": 0, "top_p": 0.5}, lm).sampling
    assert (s.temperature, s.top_p) == (0.0, 0.5)  # explicit values win


def test_the_chat_page_leaves_sampling_to_the_server():
    from septet.serve.page import PAGE

    script = PAGE.split("<script>")[1].split("</script>")[0]
    assert "JSON.stringify({messages, stream: true" in script
    assert "temperature" not in script and "top_p" not in script


def test_a_looping_reply_is_ended_by_the_repetition_guard(lm):
    """A row whose tokens become one n-gram repeated back to back (constructed ids, fed to the
    scheduler's per-token hand-off) ends as "stop" once the guard sees the loop; with the
    guard off in the request it runs to its budget."""
    from septet.inference import Sampling
    from septet.serve.openai import Request, RequestError, parse_completion
    from septet.serve.scheduler import Job, Scheduler, _Row

    loop = [40, 41, 42, 43, 44]  # a 5-token phrase, repeated
    stop_ids, context = lm.stop_ids(), lm.model.config.context
    ended = {}
    for guard in (True, False):
        row = _Row(Job(Request([5, 6], Sampling(max_new_tokens=60, temperature=0), (), False, False, guard)), lm)
        n = 0
        while Scheduler._emit(row, loop[n % 5], stop_ids, context):
            n += 1
        ended[guard] = (n + 1, row.job.finish_reason)
    assert ended[True] == (20, "stop")  # 4 copies of the phrase: the guard's threshold
    assert ended[False] == (60, "length")
    assert parse_completion({"prompt": "x", "max_tokens": 4}, lm).repetition_guard is True
    assert parse_completion({"prompt": "x", "max_tokens": 4, "repetition_guard": False}, lm).repetition_guard is False
    with pytest.raises(RequestError, match="repetition_guard"):
        parse_completion({"prompt": "x", "repetition_guard": "yes"}, lm)
