// The gateway's chat page: plain browser JavaScript, no build step.
// It talks to the same public API as any client: /v1/chat/completions, /v1/completions/{id},
// /v1/feedback.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { messages: [] };

const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("palm-rlhf-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("palm-rlhf-api-key", keyInput.value.trim()));

function headers(extra = {}) {
  const h = { "Content-Type": "application/json", ...extra };
  const key = keyInput.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(method, path, body, extraHeaders) {
  const resp = await fetch(path, {
    method,
    headers: headers(extraHeaders),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const msg = (data.error && data.error.message) || `HTTP ${resp.status}`;
    throw new Error(msg);
  }
  return data;
}

function setStatus(text) { $("#status").textContent = text; }

function addTurn(role, text) {
  const el = document.createElement("article");
  el.className = `turn ${role}`;
  el.textContent = text;
  $("#conversation").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function fmt(x) { return x === null || x === undefined ? "n/a" : Number(x).toFixed(3); }

function newKey() {
  return (crypto.randomUUID && crypto.randomUUID()) || `${Date.now()}-${Math.random()}`;
}

async function sendFeedback(body, ack) {
  try {
    // one key per click: a network retry of this post is stored once
    await api("POST", "/v1/feedback", body, { "Idempotency-Key": newKey() });
    ack.textContent = "thanks!";
    return true;
  } catch (e) {
    ack.textContent = `not saved: ${e.message}`;
    ack.style.color = "var(--bad)";
    return false;
  }
}

// the thumbs icons of the page's template (inline SVG: no emoji font needed)
function thumbIcon(direction) {
  return $(`#answer-template`).content.querySelector(`.thumb.${direction} svg`).cloneNode(true);
}

function markChosen(buttons, chosen) {
  buttons.forEach((b) => b.classList.toggle("chosen", b === chosen));
}

// a new, empty answer card at the end of the conversation
function answerNode() {
  const node = $("#answer-template").content.firstElementChild.cloneNode(true);
  $("#conversation").appendChild(node);
  return node;
}

function renderAnswer(completion, node = answerNode()) {
  const choice = completion.choices[0];
  node.classList.remove("streaming");
  node.dataset.completionId = completion.id;
  $(".text", node).textContent = choice.message.content || "(empty answer)";
  // an answer that ran into its token limit may stop mid-word: say so
  $(".cut", node).hidden = choice.finish_reason !== "length";
  const dropped = (completion.palm_rlhf && completion.palm_rlhf.dropped_turns) || 0;
  $(".meta", node).textContent =
    `reward ${fmt(choice.reward)} · best of ${completion.best_of} · policy ${completion.policy_version || "?"}` +
    ` · reward model ${completion.reward_version || "?"}` +
    (dropped ? ` · ${dropped} oldest turn${dropped > 1 ? "s" : ""} left out to fit the model` : "");
  const ack = $(".ack", node);
  const thumbs = [...node.querySelectorAll(".thumb")];
  thumbs.forEach((b) => b.addEventListener("click", async () => {
    const ok = await sendFeedback({ completion_id: completion.id, choice_index: 0, thumbs: b.classList.contains("up") ? "up" : "down" }, ack);
    if (ok) markChosen(thumbs, b);
  }));
  const stars = [...node.querySelectorAll(".stars button")];
  stars.forEach((b) => b.addEventListener("click", async () => {
    const ok = await sendFeedback({ completion_id: completion.id, choice_index: 0, rating: Number(b.dataset.rating) }, ack);
    if (ok) markChosen(stars, b);
  }));
  $(".show-candidates", node).addEventListener("click", () => toggleCandidates(node, completion.id));
  node.scrollIntoView({ block: "end" });
}

// One answer (best of 1) streamed token by token: server-sent chat.completion.chunk events
// fill the card as they come; the last chunk brings the finish reason and the reward.
async function streamAnswer(body) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }),
  });
  if (!resp.ok) {
    const data = await resp.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || `HTTP ${resp.status}`);
  }
  const node = answerNode();
  node.classList.add("streaming");
  const textEl = $(".text", node);
  const completion = { id: "", best_of: 1, choices: [{ message: { content: "" }, finish_reason: null, reward: null }] };
  const choice = completion.choices[0];
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data || data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || "the stream failed");
        completion.id = event.id || completion.id;
        for (const key of ["policy_version", "reward_version", "palm_rlhf"]) {
          if (event[key] !== undefined) completion[key] = event[key];
        }
        for (const c of event.choices || []) {
          if (c.delta && c.delta.content) {
            choice.message.content += c.delta.content;
            textEl.textContent = choice.message.content;
            node.scrollIntoView({ block: "end" });
          }
          if (c.finish_reason) choice.finish_reason = c.finish_reason;
          if (c.reward !== undefined && c.reward !== null) choice.reward = c.reward;
        }
      }
    }
  } catch (e) {
    node.remove();
    throw e;
  }
  choice.message.content = choice.message.content.trim();
  renderAnswer(completion, node);
  return completion;
}

async function toggleCandidates(node, completionId) {
  const section = $(".candidates", node);
  if (!section.hidden) { section.hidden = true; return; }
  const list = $(".candidate-list", section);
  const ack = $(".ack", node);
  let record;
  try {
    record = await api("GET", `/v1/completions/${encodeURIComponent(completionId)}`);
  } catch (e) {
    ack.textContent = `could not load candidates: ${e.message}`;
    return;
  }
  list.replaceChildren();
  const selA = $(".cmp-a", section), selB = $(".cmp-b", section);
  selA.replaceChildren(); selB.replaceChildren();
  for (const c of record.candidates) {
    const li = document.createElement("li");
    li.dataset.index = c.index;
    const text = document.createElement("span");
    text.className = "candidate-text";
    text.textContent = c.text || "(empty)";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `reward ${fmt(c.reward)}${c.shown ? " · shown" : ""}`;
    const up = document.createElement("button");
    up.type = "button"; up.className = "cand-up"; up.title = "Good answer";
    up.setAttribute("aria-label", "thumbs up"); up.append(thumbIcon("up"));
    const down = document.createElement("button");
    down.type = "button"; down.className = "cand-down"; down.title = "Bad answer";
    down.setAttribute("aria-label", "thumbs down"); down.append(thumbIcon("down"));
    [up, down].forEach((b) => b.addEventListener("click", async () => {
      const ok = await sendFeedback({ completion_id: completionId, choice_index: c.index, thumbs: b === up ? "up" : "down" }, ack);
      if (ok) markChosen([up, down], b);
    }));
    li.append(text, score, " ", up, down);
    list.appendChild(li);
    const label = `#${c.index + 1}: ${(c.text || "(empty)").slice(0, 40)}`;
    selA.add(new Option(label, c.index));
    selB.add(new Option(label, c.index));
  }
  if (record.candidates.length > 1) selB.selectedIndex = 1;
  $(".compare", section).hidden = record.candidates.length < 2;
  const prefer = (first) => async () => {
    const a = Number(selA.value), b = Number(selB.value);
    if (a === b) { ack.textContent = "pick two different candidates"; return; }
    await sendFeedback({
      completion_id: completionId,
      preferred_index: first ? a : b,
      rejected_index: first ? b : a,
    }, ack);
  };
  $(".prefer-a", section).onclick = prefer(true);
  $(".prefer-b", section).onclick = prefer(false);
  section.hidden = false;
}

$("#composer").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text) return;
  $("#prompt").value = "";
  addTurn("user", text);
  state.messages.push({ role: "user", content: text });
  const bestOf = Math.max(1, Math.min(16, Number($("#best-of").value) || 1));
  const body = {
    model: "palm-rlhf",
    messages: state.messages,
    n: 1,
    best_of: bestOf,
    temperature: Number($("#temperature").value),
  };
  // empty: the gateway gives the answer all the room the conversation leaves in the context
  const maxTokens = Number($("#max-tokens").value);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  $("#send").disabled = true;
  setStatus(`thinking (${bestOf} candidate${bestOf > 1 ? "s" : ""})…`);
  try {
    let completion;
    if (bestOf === 1) {
      completion = await streamAnswer(body);  // nothing to rank: show the tokens as they come
    } else {
      completion = await api("POST", "/v1/chat/completions", body);
      renderAnswer(completion);
    }
    state.messages.push({ role: "assistant", content: completion.choices[0].message.content });
    setStatus("");
  } catch (e) {
    state.messages.pop();
    addTurn("error", `Error: ${e.message}`);
    setStatus("");
  } finally {
    $("#send").disabled = false;
    $("#prompt").focus();
  }
});

$("#prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("#composer").requestSubmit();
  }
});

$("#new-chat").addEventListener("click", () => {
  state.messages = [];
  $("#conversation").replaceChildren();
});
