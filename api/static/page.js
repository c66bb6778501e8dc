// The page: a form that submits a job, the job's stages and answer as its events arrive, the
// frames the model saw, follow-up questions, recent jobs and the API key. Text from the service
// is only ever set as textContent, never parsed as HTML.

import * as api from "./client.js";
import { jobEvents } from "./events.js";

const STAGES = [
  ["queued", "Queued"],
  ["ingesting", "Sampling frames"],
  ["queued_gpu", "Waiting for a GPU"],
  ["generating", "Generating"],
];
const ENDINGS = { succeeded: "Answered", failed: "Failed", cancelled: "Cancelled" };
const IMAGE_URL = /\.(jpe?g|png|gif|webp|bmp|tiff?)([?#]|$)/i;

const $ = (id) => document.getElementById(id);
const chosenFiles = [];
let shown = null; // {id, controller, blobs, seen, record}

function element(tag, { className, text, attrs } = {}, children = []) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function showError(box, error) {
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  if (error instanceof api.ApiError && error.needsKey) askForKey(error);
  box.textContent = typeof error === "string" ? error : api.describe(error);
  box.hidden = false;
}

// ---- the API key ------------------------------------------------------------------------------

function askForKey(error) {
  $("auth").hidden = false;
  const status = $("key-status");
  status.textContent = api.apiKey() ? `The service refused this key: ${error.message}.` : "Enter an API key to go on.";
  status.className = "error-text";
  $("api-key").setAttribute("aria-invalid", "true");
}

async function useKey(event) {
  event.preventDefault();
  api.setApiKey($("api-key").value.trim());
  $("key-status").textContent = "Checking the key…";
  $("key-status").className = "";
  if (await refreshJobs()) {
    $("key-status").textContent = "Key accepted.";
    $("api-key").removeAttribute("aria-invalid");
  }
}

function forgetKey() {
  api.setApiKey("");
  $("api-key").value = "";
  $("key-status").textContent = "The key is forgotten.";
  $("key-status").className = "";
  refreshJobs();
}

// ---- choosing media ---------------------------------------------------------------------------

function renderFiles() {
  const list = $("file-list");
  list.replaceChildren(
    ...chosenFiles.map((file, i) => {
      const remove = element("button", { className: "link", text: "Remove", attrs: { type: "button", "aria-label": `Remove ${file.name}` } });
      remove.addEventListener("click", () => { chosenFiles.splice(i, 1); renderFiles(); });
      const size = `${(file.size / 1e6).toFixed(1)} MB`;
      return element("li", {}, [element("span", { className: "name", text: `${file.name} (${size})` }), remove]);
    }),
  );
}

function addFiles(files) {
  for (const file of files) chosenFiles.push(file);
  renderFiles();
}

function wireDropzone() {
  const zone = $("dropzone");
  $("files").addEventListener("change", (event) => { addFiles(event.target.files); event.target.value = ""; });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
}

// ---- submitting -------------------------------------------------------------------------------

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : value;
}

// Files go as multipart (their bytes in the body), URLs as JSON: the API takes one or the other.
function buildRequest() {
  const question = $("question").value.trim();
  const urls = $("urls").value.split(/\s+/).filter(Boolean);
  if (!question) throw new Error("Type a question first.");
  if (!chosenFiles.length && !urls.length) throw new Error("Choose or drop a video or image, or paste a URL.");
  if (chosenFiles.length && urls.length) throw new Error("Send files or URLs in one question, not both.");
  const numFrames = numberField("num-frames");
  const maxNewTokens = numberField("max-new-tokens");
  if (chosenFiles.length) {
    const form = new FormData();
    for (const file of chosenFiles) form.append(file.type.startsWith("image/") ? "images" : "videos", file, file.name);
    form.append("question", question);
    if (numFrames) form.append("num_frames", numFrames);
    if (maxNewTokens) form.append("max_new_tokens", maxNewTokens);
    return form;
  }
  const body = {
    question,
    videos: urls.filter((url) => !IMAGE_URL.test(url)).map((url) => ({ url })),
    images: urls.filter((url) => IMAGE_URL.test(url)).map((url) => ({ url })),
  };
  if (numFrames) body.sampling = { num_frames: Number(numFrames) };
  if (maxNewTokens) body.generation = { max_new_tokens: Number(maxNewTokens) };
  return body;
}

async function ask(event) {
  event.preventDefault();
  showError($("ask-error"), null);
  let body;
  try {
    body = buildRequest();
  } catch (error) {
    showError($("ask-error"), error.message);
    return;
  }
  const button = $("submit");
  button.disabled = true;
  button.textContent = "Sending…";
  try {
    const job = await api.submitJob(body);
    // The media went with this job; the question and options stay, to be edited for the next.
    chosenFiles.length = 0;
    renderFiles();
    $("urls").value = "";
    show(job.id, { question: job.request && job.request.question });
    $("job").focus();
    refreshJobs();
  } catch (error) {
    showError($("ask-error"), error);
  } finally {
    button.disabled = false;
    button.textContent = "Ask";
  }
}

async function followUp(event) {
  event.preventDefault();
  const errorBox = $("followup-error");
  showError(errorBox, null);
  const question = $("followup").value.trim();
  if (!question) return showError(errorBox, "Type a follow-up question first.");
  const button = $("followup-submit");
  button.disabled = true;
  try {
    const job = await api.submitJob({ parent: shown.id, question });
    $("followup").value = "";
    show(job.id, { question, keepTurns: true });
    refreshJobs();
  } catch (error) {
    showError(errorBox, error);
    const unknown = error.details && error.details.some((d) => d.field === "parent" && /^unknown field/.test(d.message));
    errorBox.prepend(unknown ? "This service does not take follow-up questions yet.\n" : "", "The follow-up was not accepted: ");
  } finally {
    button.disabled = false;
  }
}

// ---- one job ----------------------------------------------------------------------------------

function renderStages() {
  const { seen, record } = shown;
  const status = record ? record.status : "queued";
  // The last step is the ending reached, or the one hoped for while the job runs.
  const ending = ENDINGS[status] ? status : "succeeded";
  const items = [...STAGES, [ending, ENDINGS[ending]]];
  $("stages").replaceChildren(
    ...items.map(([name, label]) => {
      const reached = seen.has(name);
      const item = element("li", { attrs: { "data-stage": name } }, [
        element("span", { className: "label", text: label }),
        element("code", { text: name }),
        element("span", { className: "when", text: reached ? `+${seen.get(name).toFixed(1)} s` : "" }),
      ]);
      item.classList.toggle("reached", reached);
      if (name === status) item.setAttribute("aria-current", "step");
      return item;
    }),
  );
  $("job-status").textContent = `Job ${ENDINGS[status] ? status : `is ${status}`}.`;
}

function turnFor(jobId, question) {
  let turn = $("turns").querySelector(`[data-job="${CSS.escape(jobId)}"]`);
  if (!turn) {
    turn = element("article", { className: "turn", attrs: { "data-job": jobId } }, [
      element("p", { className: "question" }, [element("span", { className: "who", text: "You asked" }), element("span", { className: "text" })]),
      element("p", { className: "answer-block" }, [
        element("span", { className: "who", text: "Answer" }),
        // Busy while tokens arrive: a screen reader reads the answer once, when it is whole.
        element("span", { className: "answer", attrs: { "aria-live": "polite", "aria-busy": "true" } }),
      ]),
    ]);
    $("turns").append(turn);
  }
  if (question) turn.querySelector(".question .text").textContent = question;
  return turn;
}

function onStatus(record) {
  shown.record = record;
  if (!shown.seen.has(record.status)) shown.seen.set(record.status, Math.max(0, record.updated_at - record.created_at));
  turnFor(record.id, record.request && record.request.question);
  renderStages();
  $("cancel").hidden = Boolean(ENDINGS[record.status]);
}

async function onDone(record) {
  onStatus(record);
  const answer = turnFor(record.id).querySelector(".answer");
  if (record.result && typeof record.result.answer === "string") answer.textContent = record.result.answer;
  answer.classList.add("final");
  answer.setAttribute("aria-busy", "false");
  if (record.status === "failed" && record.error) {
    showError($("job-error"), `The job failed: ${record.error.message} (${record.error.code})`);
  } else if (record.status === "cancelled") {
    showError($("job-error"), "The job was cancelled.");
  }
  $("followup-form").hidden = record.status !== "succeeded";
  await showFrames(record);
  refreshJobs();
}

async function showFrames(record) {
  const frames = (record.result && record.result.frames) || [];
  const list = $("frames");
  $("frames-title").hidden = frames.length === 0;
  const videos = new Set(frames.map((frame) => frame.video)).size;
  const mine = shown;
  const items = frames.map((frame, n) => {
    const when = `${frame.time.toFixed(2)} s`;
    const caption = videos > 1 ? `video ${frame.video + 1} · ${when}` : when;
    const image = element("img", { attrs: { alt: `Frame ${n + 1}, ${caption}`, width: "160", height: "160" } });
    const item = element("li", {}, [element("figure", {}, [image, element("figcaption", { text: caption, attrs: { "data-time": String(frame.time) } })])]);
    api.frameUrl(record.id, n, mine.controller.signal).then(
      (url) => { mine.blobs.push(url); image.src = url; },
      (error) => { if (error.name !== "AbortError") item.append(element("p", { className: "error-text", text: api.describe(error) })); },
    );
    return item;
  });
  list.replaceChildren(...items);
}

function leave() {
  if (!shown) return;
  shown.controller.abort();
  for (const url of shown.blobs) URL.revokeObjectURL(url);
}

async function show(jobId, { question, keepTurns = false } = {}) {
  leave();
  shown = { id: jobId, controller: new AbortController(), blobs: [], seen: new Map(), record: null };
  const mine = shown;
  $("job-empty").hidden = true;
  $("job-view").hidden = false;
  $("job-id").textContent = jobId;
  if (!keepTurns) $("turns").replaceChildren();
  turnFor(jobId, question);
  for (const id of ["job-error", "followup-error"]) showError($(id), null);
  $("followup-form").hidden = true;
  $("frames").replaceChildren();
  $("frames-title").hidden = true;
  $("cancel").hidden = false;
  renderStages();
  markCurrent();
  try {
    for await (const message of jobEvents(jobId, mine.controller.signal)) {
      if (message.event === "status") onStatus(message.data);
      else if (message.event === "token") turnFor(jobId).querySelector(".answer").append(message.data.text);
      else if (message.event === "done") await onDone(message.data);
    }
  } catch (error) {
    if (error.name !== "AbortError" && shown === mine) showError($("job-error"), error);
  }
}

async function cancel() {
  try {
    onStatus(await api.cancelJob(shown.id));
  } catch (error) {
    showError($("job-error"), error);
  }
}

// ---- recent jobs ------------------------------------------------------------------------------

function markCurrent() {
  for (const button of $("jobs").querySelectorAll("button[data-job]")) {
    if (shown && button.dataset.job === shown.id) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

// True when the list loaded; a 401 shows the key form instead.
async function refreshJobs() {
  try {
    const page = await api.listJobs();
    showError($("jobs-error"), null);
    if (api.apiKey()) $("auth").hidden = false;
    $("jobs-empty").hidden = page.jobs.length > 0;
    $("jobs").replaceChildren(
      ...page.jobs.map((job) => {
        const question = (job.request && job.request.question) || "(no question)";
        const when = new Date(job.created_at * 1000).toLocaleTimeString();
        const button = element("button", { className: "job", attrs: { type: "button", "data-job": job.id } }, [
          element("span", { className: `badge ${job.status}`, text: job.status }),
          element("span", { className: "q", text: question }),
          element("span", { className: "when", text: when }),
        ]);
        button.addEventListener("click", () => { show(job.id); $("job").focus(); });
        return element("li", {}, [button]);
      }),
    );
    markCurrent();
    return true;
  } catch (error) {
    // A missing or refused key is said once, in the key form (showError would too).
    if (error instanceof api.ApiError && error.needsKey) {
      // Without a valid key there is no list to show (nor the one an earlier key saw).
      askForKey(error);
      showError($("jobs-error"), null);
      $("jobs").replaceChildren();
      $("jobs-empty").hidden = true;
    } else {
      showError($("jobs-error"), error);
    }
    return false;
  }
}

function start() {
  $("api-key").value = api.apiKey();
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("ask-form").addEventListener("submit", ask);
  $("followup-form").addEventListener("submit", followUp);
  $("cancel").addEventListener("click", cancel);
  $("refresh-jobs").addEventListener("click", refreshJobs);
  wireDropzone();
  refreshJobs();
}

start();
