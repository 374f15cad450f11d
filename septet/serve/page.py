"""The chat page `septet serve` shows at GET /: plain HTML and JavaScript, no external files.
It keeps the conversation in the page and streams each answer from /v1/chat/completions;
text is inserted with textContent, never as HTML. It sends no temperature or top_p, so the
server's defaults apply: the model's recommended values (septet.generation_config)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>septet chat</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 46rem; margin: 0 auto; padding: 1rem; }
  #log div { white-space: pre-wrap; margin: .5rem 0; padding: .5rem .75rem; border-radius: .5rem; }
  .user { background: #e8f0fe; } .assistant { background: #f3f3f3; } .error { background: #fde8e8; }
  form { display: flex; gap: .5rem; } textarea { flex: 1; font: inherit; min-height: 3rem; }
  small { color: #666; }
</style>
</head>
<body>
<h3>septet chat <small>{{MODEL}}</small></h3>
<div id="log"></div>
<form id="f">
  <textarea id="q" placeholder="Ask something (Enter sends, Shift+Enter adds a line)"></textarea>
  <button>Send</button> <button type="button" id="reset">Reset</button>
</form>
<script>
const log = document.getElementById("log"), q = document.getElementById("q");
let messages = [];
function add(role, text) {
  const d = document.createElement("div"); d.className = role; d.textContent = text;
  log.appendChild(d); d.scrollIntoView(); return d;
}
document.getElementById("reset").onclick = () => { messages = []; log.textContent = ""; };
q.addEventListener("keydown", e => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); document.getElementById("f").requestSubmit(); }
});
document.getElementById("f").onsubmit = async e => {
  e.preventDefault();
  const text = q.value.trim(); if (!text) return;
  q.value = ""; add("user", text); messages.push({role: "user", content: text});
  const out = add("assistant", "");
  const r = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({messages, stream: true, max_tokens: 256})});  // sampling: the server's defaults
  if (!r.ok) { out.className = "error"; out.textContent = (await r.json()).error.message; messages.pop(); return; }
  const reader = r.body.getReader(), dec = new TextDecoder(); let buf = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\\n\\n")) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const obj = JSON.parse(line.slice(6));
      if (obj.error) { out.className = "error"; out.textContent = obj.error.message; continue; }
      const piece = obj.choices[0].delta.content;
      if (piece) { out.textContent += piece; out.scrollIntoView(); }
    }
  }
  messages.push({role: "assistant", content: out.textContent});
};
</script>
</body>
</html>
"""
