// The before/after comparison of the page of scripts/app.py (loaded before app.js, which calls makeCompare and element).
"use strict";

// A before/after comparison: the divider follows a drag by mouse, touch or pen (pointer capture: it keeps following
// outside the picture until the button is released), and the arrow keys once it has the focus.  The pictures cannot
// be dragged out (draggable=false, no pointer events, dragstart cancelled): a native image drag would take the pointer
// away after the first move (pointercancel), leaving the divider where the drag began.
const KEY_STEPS = { ArrowLeft: -2, ArrowDown: -2, ArrowRight: 2, ArrowUp: 2, PageDown: -10, PageUp: 10 };
// a new element with its class and properties (set in the order given: an image's onload before its src)
const element = (tag, className, properties) => Object.assign(document.createElement(tag), { className, ...properties });
function makeCompare(beforeUrl, afterUrl, afterAlt, onBeforeLoad) {
  const compare = element("div", "compare", {
    title: "drag to compare before (left) and after (right); or focus the divider and use the arrow keys",
  });
  const before = element("img", "before", { alt: "before", onload: () => onBeforeLoad(before), src: beforeUrl });
  const after = element("img", "after", { alt: afterAlt, src: afterUrl });
  for (const img of [before, after]) img.draggable = false;
  const divider = element("div", "divider", { tabIndex: 0 });
  const aria = { role: "slider", "aria-label": "before/after divider: the arrow keys move it",
    "aria-orientation": "horizontal", "aria-valuemin": "0", "aria-valuemax": "100" };
  for (const [name, value] of Object.entries(aria)) divider.setAttribute(name, value);
  const left = element("span", "tag l", { textContent: "before" });
  const right = element("span", "tag r", { textContent: "after" });
  compare.append(before, after, divider, left, right);

  const setSplit = (percent) => {
    const p = Math.round(Math.min(Math.max(percent, 0), 100) * 10) / 10;
    after.style.clipPath = `inset(0 0 0 ${p}%)`;
    divider.style.left = `${p}%`;
    divider.setAttribute("aria-valuenow", `${p}`);
    divider.setAttribute("aria-valuetext", `${Math.round(p)}% before, ${Math.round(100 - p)}% after`);
    compare.dataset.split = `${p}`;
  };
  const fromPointer = (ev) => {
    const box = compare.getBoundingClientRect();
    if (box.width > 0) setSplit(((ev.clientX - box.left) / box.width) * 100);
  };
  compare.addEventListener("dragstart", (ev) => ev.preventDefault());
  compare.addEventListener("pointerdown", (ev) => {
    if (ev.pointerType === "mouse" && ev.button !== 0) return;
    ev.preventDefault(); // no text selection, no image drag, no scrolling
    compare.setPointerCapture(ev.pointerId);
    divider.focus({ preventScroll: true }); // the arrow keys go on from where the drag ended
    fromPointer(ev);
  });
  compare.addEventListener("pointermove", (ev) => {
    if (compare.hasPointerCapture(ev.pointerId)) fromPointer(ev);
  });
  const release = (ev) => {
    if (compare.hasPointerCapture(ev.pointerId)) compare.releasePointerCapture(ev.pointerId);
  };
  compare.addEventListener("pointerup", release);
  compare.addEventListener("pointercancel", release);
  divider.addEventListener("keydown", (ev) => {
    const now = Number(compare.dataset.split);
    let next = null;
    if (ev.key in KEY_STEPS) next = now + KEY_STEPS[ev.key] * (ev.shiftKey ? 5 : 1);
    else if (ev.key === "Home") next = 0;
    else if (ev.key === "End") next = 100;
    if (next === null) return;
    ev.preventDefault(); // the arrows move the divider, not the page
    setSplit(next);
  });
  setSplit(50);
  return compare;
}
