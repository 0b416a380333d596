// Progressive enhancement only: a copy button on each command.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  if (!navigator.clipboard) return; // plain HTTP on a remote host: no clipboard API
  for (const pre of document.querySelectorAll("pre.cmd")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "copy";
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(pre.firstChild.textContent.trim());
        button.textContent = "copied";
      } catch (err) {
        button.textContent = "select it";
      }
      setTimeout(() => { button.textContent = "copy"; }, 1500);
    });
    pre.appendChild(button);
  }
});
