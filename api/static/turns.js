// A conversation as turns, oldest first: each question with its answer. The job on show has a turn
// of its own (marked with its id), whose answer grows as tokens arrive; the turns before it come
// from its record's request.history.

import { element } from "./dom.js";

// Where an earlier question's media went (docs/conversations.md); the frames are shown apart.
const LEADING_PLACEHOLDERS = /^(?:<video>|<image>)+\n?/;

function turn(attrs, parts) {
  return element("article", { className: "turn", attrs }, parts.map(([kind, who, text, textAttrs]) =>
    element("p", { className: kind === "answer" ? "answer-block" : "question" }, [
      element("span", { className: "who", text: who }),
      element("span", { className: kind === "answer" ? "answer" : "text", text, attrs: textAttrs }),
    ])));
}

// The job's own turn in ``container``, made when missing; ``question`` set when given.
export function turnFor(container, jobId, question) {
  let own = container.querySelector(`[data-job="${CSS.escape(jobId)}"]`);
  if (!own) {
    own = turn({ "data-job": jobId }, [
      ["question", "You asked", ""],
      // Busy while tokens arrive: a screen reader reads the answer once, when it is whole.
      ["answer", "Answer", undefined, { "aria-live": "polite", "aria-busy": "true" }],
    ]);
    container.append(own);
  }
  if (question) own.querySelector(".question .text").textContent = question;
  return own;
}

// The turns of ``history`` ([{role, content}], as a job's request holds it), each user turn with
// the assistant turn after it; a system turn is shown as the instructions it is.
export function earlierTurns(history) {
  const turns = [];
  for (const { role, content } of Array.isArray(history) ? history : []) {
    const last = turns[turns.length - 1];
    if (role === "assistant" && last && last.length === 1 && last[0][1] === "You asked") {
      last.push(["answer", "Answer", content]);
    } else if (role === "user") {
      turns.push([["question", "You asked", String(content).replace(LEADING_PLACEHOLDERS, "")]]);
    } else {
      turns.push([role === "system" ? ["question", "Instructions", content] : ["answer", "Answer", content]]);
    }
  }
  return turns.map((parts) => {
    const earlier = turn({}, parts);
    earlier.classList.add("earlier");
    for (const answer of earlier.querySelectorAll(".answer")) answer.classList.add("final");
    return earlier;
  });
}
