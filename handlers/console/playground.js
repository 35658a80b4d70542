// The Playground: send a prompt with a caller key and watch the answer stream in.

import { errorMessage } from "./admin.js";
import { readEvents } from "./sse.js";

/** What each API is called with, and how its stream carries text and usage. */
const APIS = {
  chat: {
    path: "/v1/chat/completions",
    body: (model, prompt) => ({
      model,
      messages: [{ role: "user", content: prompt }],
      stream: true,
      stream_options: { include_usage: true },
    }),
    // One chat.completion.chunk per `data:`; the stream ends with `data: [DONE]`.
    read(event, answer) {
      if (event.data === "[DONE]") return true;
      const chunk = JSON.parse(event.data);
      if (chunk.error) throw new Error(chunk.error.message || "The stream reported an error.");
      if (chunk.model) answer.model(chunk.model);
      const text = chunk.choices?.[0]?.delta?.content;
      if (text) answer.text(text);
      if (chunk.usage) answer.tokens(chunk.usage.prompt_tokens, chunk.usage.completion_tokens);
      return false;
    },
  },
  responses: {
    path: "/v1/responses",
    body: (model, prompt) => ({ model, input: prompt, stream: true }),
    // Typed events (`event:` lines); the stream ends after the terminal one.
    read(event, answer) {
      const data = JSON.parse(event.data);
      const type = data.type || event.type;
      if (type === "response.output_text.delta") answer.text(data.delta ?? "");
      if (type === "error") throw new Error(data.message || "The stream reported an error.");
      if (["response.completed", "response.incomplete", "response.failed"].includes(type)) {
        const response = data.response ?? {};
        if (response.model) answer.model(response.model);
        const usage = response.usage;
        if (usage) answer.tokens(usage.input_tokens, usage.output_tokens);
        if (type === "response.failed") {
          throw new Error(response.error?.message || "The response failed.");
        }
        return true;
      }
      return false;
    },
  },
};

export function setUpPlayground(section) {
  const form = section.querySelector("#chat-form");
  const stop = section.querySelector("#stop");
  const send = section.querySelector("#send");
  const error = section.querySelector("#chat-error");
  const answerBox = section.querySelector("#answer");
  const raw = section.querySelector("#raw-events");
  const modelsNote = section.querySelector("#models-note");
  const facts = {
    requestId: section.querySelector("#fact-request-id"),
    attempts: section.querySelector("#fact-attempts"),
    deployment: section.querySelector("#fact-deployment"),
    model: section.querySelector("#fact-model"),
    ttft: section.querySelector("#fact-ttft"),
    tokens: section.querySelector("#fact-tokens"),
  };
  let controller = null;

  function authorization() {
    const key = form.elements.key.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function showError(message) {
    error.textContent = message;
    error.hidden = false;
  }

  async function listModels() {
    modelsNote.textContent = "";
    try {
      const response = await fetch("/v1/models", { headers: authorization(), cache: "no-store" });
      if (!response.ok) {
        modelsNote.textContent = `Models could not be listed: ${await errorMessage(response)}`;
        return;
      }
      const body = await response.json();
      const options = (body.data ?? []).map((model) => {
        const option = document.createElement("option");
        option.value = model.id;
        return option;
      });
      section.querySelector("#model-names").replaceChildren(...options);
      if (!form.elements.model.value && options.length) {
        form.elements.model.value = options[0].value;
      }
    } catch (failure) {
      modelsNote.textContent = `Models could not be listed: ${failure.message}`;
    }
  }

  function reset() {
    error.hidden = true;
    error.textContent = "";
    answerBox.textContent = "";
    raw.textContent = "";
    for (const fact of Object.values(facts)) fact.textContent = "–";
  }

  async function run(event) {
    event.preventDefault();
    const api = APIS[form.elements.api.value];
    const model = form.elements.model.value.trim();
    const prompt = form.elements.prompt.value;
    reset();
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    const started = performance.now();
    let firstToken = null;
    const answer = {
      text(piece) {
        if (!piece) return;
        if (firstToken === null) {
          firstToken = performance.now() - started;
          facts.ttft.textContent = `${Math.round(firstToken)} ms`;
        }
        answerBox.append(piece);
      },
      model(name) {
        if (name) facts.model.textContent = name;
      },
      tokens(input, output) {
        facts.tokens.textContent = `${input ?? "–"} / ${output ?? "–"}`;
      },
    };
    try {
      const response = await fetch(api.path, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authorization() },
        body: JSON.stringify(api.body(model, prompt)),
        signal: controller.signal,
        cache: "no-store",
      });
      facts.requestId.textContent = response.headers.get("x-request-id") || "–";
      facts.attempts.textContent = response.headers.get("x-upstream-attempts") || "–";
      facts.deployment.textContent = response.headers.get("x-upstream-deployment") || "–";
      if (!response.ok) {
        showError(`${response.status}: ${await errorMessage(response)}`);
        return;
      }
      const type = response.headers.get("Content-Type") || "";
      if (!type.includes("text/event-stream")) {
        showError(`Expected an event stream, got ${type || "no Content-Type"}.`);
        return;
      }
      for await (const sse of readEvents(response.body)) {
        raw.append(`${sse.type === "message" ? "" : `event: ${sse.type}\n`}data: ${sse.data}\n\n`);
        if (api.read(sse, answer)) break;
      }
    } catch (failure) {
      if (failure.name === "AbortError") showError("Stopped.");
      else showError(failure.message);
    } finally {
      controller = null;
      send.disabled = false;
      stop.disabled = true;
    }
  }

  form.addEventListener("submit", run);
  stop.addEventListener("click", () => controller?.abort());
  form.elements.key.addEventListener("change", listModels);
}
