// Aurora's chat page: a query goes out as a POST, the answer comes back as
// events of the chat session's topic over an EventSource. The browser
// reconnects by itself and sends the id it last saw (Last-Event-ID): tidings
// resumes the topic from there, so an answer cut mid-sentence carries on with
// the next chunk, none lost, none twice.
"use strict";

const conversation = document.getElementById("conversation");
const streamState = document.getElementById("stream-state");
let sessionId = null;
let source = null;
let answer = null; // the element the current answer's chunks go into

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setState(state) {
  streamState.textContent = state;
  document.body.dataset.stream = state;
}

function currentAnswer() {
  if (answer === null) {
    answer = element("div", "answer");
    conversation.append(answer);
  }
  return answer;
}

// One frame of the workflow, as the chat's WebSocket would carry it.
function render(frame) {
  const data = frame.data || {};
  switch (frame.type) {
    case "status":
      if (data.status === "START") {
        answer = null;
        currentAnswer();
      } else if (data.status === "END") {
        currentAnswer().classList.add("done");
        answer = null;
      }
      break;
    case "message":
      currentAnswer().append(document.createTextNode(data.text));
      break;
    case "tool_call": {
      const tool = element("div", "tool", `running ${data.tool_name}`);
      tool.dataset.call = data.tool_call_id;
      tool.append(element("pre"));
      currentAnswer().append(tool);
      break;
    }
    case "tool_output": {
      const pre = conversation.querySelector(`[data-call="${data.tool_call_id}"] pre`);
      if (pre) pre.append(document.createTextNode(data.output));
      break;
    }
    case "usage_info":
      currentAnswer().append(element("div", "usage", `session cost so far: $${data.total_cost}`));
      break;
    case "error":
      currentAnswer().append(element("div", "error", data.text));
      break;
    default:
      break; // tool_result, confirmation_request: shown by the WebSocket client only
  }
}

function follow(topic) {
  // since=0: the whole session, from its first frame; after that the browser's
  // own reconnects carry Last-Event-ID and the server resumes from it.
  source = new EventSource(`/sse?topic=${encodeURIComponent(topic)}&since=0`);
  source.onopen = () => setState("streaming");
  source.onerror = () => setState(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
  source.onmessage = (message) => render(JSON.parse(message.data).payload);
  source.addEventListener("reset", () => {
    conversation.append(element("p", "usage", "Part of this conversation is no longer available."));
  });
}

document.getElementById("ask").addEventListener("submit", async (submitted) => {
  submitted.preventDefault();
  const input = document.getElementById("query");
  const query = input.value.trim();
  if (!query) return;
  conversation.append(element("div", "question", query));
  input.value = "";
  const response = await fetch("/chat/query", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ query, session_id: sessionId, mode: "ask" }),
  });
  const started = await response.json();
  if (!response.ok) {
    conversation.append(element("div", "answer error", started.error.message));
    return;
  }
  sessionId = started.session_id;
  if (source === null) follow(started.topic);
});
