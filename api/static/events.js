// GET /v1/jobs/{id}/events read with fetch and a streaming body reader: EventSource cannot send
// the Authorization header an API key needs. Parsed as the Server-Sent Events format says; a
// broken connection resumes with Last-Event-ID, so no event is missed or seen twice.

import { ApiError, authHeaders, errorFrom } from "./client.js";

const RETRIES = 5;
const RETRY_DELAY_MS = 1000;

function* parseBlock(block) {
  let event = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue; // a comment keeps the connection open
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  if (data.length) yield { id, event, data: JSON.parse(data.join("\n")) };
}

async function* readOnce(jobId, lastEventId, signal) {
  const headers = authHeaders({ Accept: "text/event-stream" });
  if (lastEventId) headers.set("Last-Event-ID", lastEventId);
  const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      yield* parseBlock(block);
    }
  }
}

const pause = (ms, signal) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); }, { once: true });
  });

// Yields {id, event, data} until the job's `done` event; an ApiError (401, 404...) ends it at once.
export async function* jobEvents(jobId, signal) {
  let lastEventId = null;
  let failures = 0;
  for (;;) {
    try {
      for await (const message of readOnce(jobId, lastEventId, signal)) {
        failures = 0;
        if (message.id) lastEventId = message.id;
        yield message;
        if (message.event === "done") return;
      }
    } catch (error) {
      if (error instanceof ApiError || signal.aborted) throw error;
      if (++failures > RETRIES) {
        throw new ApiError(0, "stream_lost", "lost the connection to the job's events; pick the job again to resume");
      }
    }
    // The stream ended (or broke) before `done`: resume after the last event seen.
    await pause(RETRY_DELAY_MS, signal);
  }
}
