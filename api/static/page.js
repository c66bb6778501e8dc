// The page: a form that submits a job, the job's stages and answer as its events arrive, the
// frames the model saw, follow-up questions and the conversation so far, recent jobs and the API
// key. Text from the service is only ever set as textContent, never parsed as HTML.

import * as api from "./client.js";
import { element } from "./dom.js";
import { jobEvents } from "./events.js";
import { ENDINGS, renderStages } from "./stages.js";
import { earlierTurns, turnFor } from "./turns.js";

const IMAGE_URL = /\.(jpe?g|png|gif|webp|bmp|tiff?)([?#]|$)/i;

const $ = (id) => document.getElementById(id);
const chosenFiles = [];
let shown = null; // the job on show: see show()

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
    show(job.id, { record: job });
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
    // Answered at the length the conversation's last question asked for (the API's default otherwise).
    const body = { parent: shown.id, question };
    const asked = shown.record && shown.record.request && shown.record.request.generation;
    if (asked && asked.max_new_tokens) body.generation = { max_new_tokens: asked.max_new_tokens };
    const job = await api.submitJob(body);
    $("followup").value = "";
    // The follow-up reuses these very frames: they stay shown while it runs.
    const frames = (shown.record && shown.record.result && shown.record.result.frames) || [];
    show(job.id, { record: job, frames });
    refreshJobs();
  } catch (error) {
    showError(errorBox, error);
    errorBox.prepend("The follow-up was not accepted: ");
  } finally {
    button.disabled = false;
  }
}

// ---- one job ----------------------------------------------------------------------------------

function showStages() {
  $("job-status").textContent = renderStages($("stages"), shown.seen, shown.record);
}

// The turns before the job's own, from its record's request.history (a follow-up's holds its
// parent's history, the parent's question and its answer), and the parent it follows.
function showEarlierTurns(record) {
  if (shown.earlierShown || !record.request) return;
  shown.earlierShown = true;
  $("turns").prepend(...earlierTurns(record.request.history));
  const parent = record.request.parent;
  if (parent) {
    const open = element("button", { className: "link", attrs: { type: "button", "aria-label": `Open job ${parent}` } }, [
      element("code", { text: parent }),
    ]);
    open.addEventListener("click", () => { show(parent); $("job").focus(); });
    $("job-parent").replaceChildren("Follow-up to job ", open);
    $("job-parent").hidden = false;
  }
}

function onStatus(record) {
  shown.record = record;
  if (!shown.seen.has(record.status)) shown.seen.set(record.status, Math.max(0, record.updated_at - record.created_at));
  turnFor($("turns"), record.id, record.request && record.request.question);
  showEarlierTurns(record);
  if (record.request && record.request.parent && !ENDINGS[record.status]) showParentFrames(record.request.parent);
  showStages();
  $("cancel").hidden = Boolean(ENDINGS[record.status]);
}

function onDone(record) {
  onStatus(record);
  const answer = turnFor($("turns"), record.id).querySelector(".answer");
  if (record.result && typeof record.result.answer === "string") answer.textContent = record.result.answer;
  answer.classList.add("final");
  answer.setAttribute("aria-busy", "false");
  if (record.status === "failed" && record.error) {
    showError($("job-error"), `The job failed: ${record.error.message} (${record.error.code})`);
  } else if (record.status === "cancelled") {
    showError($("job-error"), "The job was cancelled.");
  }
  $("followup-form").hidden = record.status !== "succeeded";
  showFrames((record.result && record.result.frames) || []);
  refreshJobs();
}

// A job's record lists its frames in result.frames only, once it has ended; a follow-up's are its
// parent's, so while it runs they are taken from the parent's record (fetched through the
// follow-up's own frames route, which serves them from its submission on).
async function showParentFrames(parentId) {
  const mine = shown;
  if (mine.frameKey !== null || mine.parentFramesAsked) return;
  mine.parentFramesAsked = true;
  try {
    const parent = await api.getJob(parentId);
    if (shown === mine && mine.frameKey === null) showFrames((parent.result && parent.result.frames) || []);
  } catch {
    // The parent is gone (retention): the frames come with the follow-up's result.
  }
}

function showFrames(frames) {
  const key = JSON.stringify(frames.map(({ video, index, time }) => [video, index, time]));
  if (key === shown.frameKey) return; // the same frames are on show already
  shown.frameKey = key;
  $("frames-title").hidden = frames.length === 0;
  const videos = new Set(frames.map((frame) => frame.video)).size;
  const mine = shown;
  const items = frames.map((frame, n) => {
    const when = `${frame.time.toFixed(2)} s`;
    const caption = videos > 1 ? `video ${frame.video + 1} · ${when}` : when;
    const image = element("img", { attrs: { alt: `Frame ${n + 1}, ${caption}`, width: "160", height: "160" } });
    const item = element("li", {}, [element("figure", {}, [image, element("figcaption", { text: caption, attrs: { "data-time": String(frame.time) } })])]);
    api.frameUrl(mine.id, n, mine.controller.signal).then(
      (url) => { mine.blobs.push(url); image.src = url; },
      (error) => { if (error.name !== "AbortError") item.append(element("p", { className: "error-text", text: api.describe(error) })); },
    );
    return item;
  });
  $("frames").replaceChildren(...items);
}

function leave() {
  if (!shown) return;
  shown.controller.abort();
  for (const url of shown.blobs) URL.revokeObjectURL(url);
}

// Shows a job from its events; ``record`` (the record POST answered) and ``frames`` (a follow-up's,
// known from its parent) show at once what is known before the first event arrives.
async function show(jobId, { record, frames } = {}) {
  leave();
  shown = {
    id: jobId, controller: new AbortController(), blobs: [], seen: new Map(), record: null,
    earlierShown: false, frameKey: null, parentFramesAsked: false,
  };
  const mine = shown;
  $("job-empty").hidden = true;
  $("job-view").hidden = false;
  $("job-id").textContent = jobId;
  $("job-parent").hidden = true;
  $("turns").replaceChildren();
  turnFor($("turns"), jobId);
  for (const id of ["job-error", "followup-error"]) showError($(id), null);
  $("followup-form").hidden = true;
  $("frames").replaceChildren();
  $("frames-title").hidden = true;
  $("cancel").hidden = false;
  if (frames && frames.length) showFrames(frames);
  if (record) onStatus(record);
  else showStages();
  markCurrent();
  try {
    for await (const message of jobEvents(jobId, mine.controller.signal)) {
      if (message.event === "status") onStatus(message.data);
      else if (message.event === "token") turnFor($("turns"), jobId).querySelector(".answer").append(message.data.text);
      else if (message.event === "done") onDone(message.data);
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

// One item per job, kept from one refresh to the next and updated in place (moved only when the
// order changed): the button a keyboard user is on keeps its focus when a job's status changes.
function showJobs(jobs) {
  const list = $("jobs");
  const kept = new Map([...list.children].map((item) => [item.firstChild.dataset.job, item]));
  const items = jobs.map((job) => {
    let item = kept.get(job.id);
    if (!item) {
      const button = element("button", { className: "job", attrs: { type: "button", "data-job": job.id } }, [
        element("span"), element("span", { className: "q" }), element("span", { className: "when" }),
      ]);
      button.addEventListener("click", () => { show(job.id); $("job").focus(); });
      item = element("li", {}, [button]);
    }
    const [badge, question, when] = item.firstChild.children;
    badge.className = `badge ${job.status}`;
    badge.textContent = job.status;
    question.textContent = (job.request && job.request.question) || "(no question)";
    when.textContent = new Date(job.created_at * 1000).toLocaleTimeString();
    return item;
  });
  items.forEach((item, i) => { if (list.children[i] !== item) list.insertBefore(item, list.children[i] || null); });
  while (list.children.length > items.length) list.lastChild.remove();
}

// True when the list loaded; a 401 shows the key form instead.
async function refreshJobs() {
  try {
    const page = await api.listJobs();
    showError($("jobs-error"), null);
    if (api.apiKey()) $("auth").hidden = false;
    $("jobs-empty").hidden = page.jobs.length > 0;
    showJobs(page.jobs);
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
