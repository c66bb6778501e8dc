// A job's stages as a list of steps: those reached (with the seconds since submission), the one it
// is at, and those a job whose frames were all stored already skipped.

import { element } from "./dom.js";

const STAGES = [
  ["queued", "Queued"],
  ["ingesting", "Sampling frames"],
  ["queued_gpu", "Waiting for a GPU"],
  ["generating", "Generating"],
];
export const ENDINGS = { succeeded: "Answered", failed: "Failed", cancelled: "Cancelled" };
// The steps a job whose frames are all stored already (a follow-up, or stored videos) never
// takes: it starts in queued_gpu.
const SKIPPED_BY_STORED_FRAMES = ["queued", "ingesting"];

function skippedCpuStage(seen, record) {
  return seen.has("queued_gpu") && !seen.has("ingesting") && !(record && record.stages && record.stages.ingest);
}

// ``seen``: each status reached, with its seconds since submission; ``record``: the job's latest
// record, or null before the first one. Returns the status in words, for a screen reader.
export function renderStages(list, seen, record) {
  const status = record ? record.status : "queued";
  const skipped = skippedCpuStage(seen, record) ? SKIPPED_BY_STORED_FRAMES : [];
  // The last step is the ending reached, or the one hoped for while the job runs.
  const ending = ENDINGS[status] ? status : "succeeded";
  const items = [...STAGES, [ending, ENDINGS[ending]]];
  list.replaceChildren(
    ...items.map(([name, label]) => {
      const reached = seen.has(name);
      const skip = !reached && skipped.includes(name);
      const item = element("li", { attrs: { "data-stage": name } }, [
        element("span", { className: "label", text: label }),
        element("code", { text: name }),
        element("span", { className: "when", text: reached ? `+${seen.get(name).toFixed(1)} s` : skip ? "skipped" : "" }),
      ]);
      item.classList.toggle("reached", reached);
      item.classList.toggle("skipped", skip);
      if (name === status) item.setAttribute("aria-current", "step");
      return item;
    }),
  );
  return `Job ${ENDINGS[status] ? status : `is ${status}`}.`;
}
