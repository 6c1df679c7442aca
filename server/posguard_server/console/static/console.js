// Keyboard use of the review queue. The pages work without this file; it only adds shortcuts.
// j / k: next / previous case in the queue (Enter opens it, as any link).
// On a case: a assigns (the Assign button), n goes to the note, f / l / r / d press the resolution buttons.
// Shortcuts are ignored while typing in a field; Escape leaves the field.
(function () {
  "use strict";
  function typing(target) {
    return target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT");
  }
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    if (typing(event.target)) {
      if (event.key === "Escape") {
        event.target.blur();
      }
      return;
    }
    var links = Array.prototype.slice.call(document.querySelectorAll("a.case-link"));
    if ((event.key === "j" || event.key === "k") && links.length) {
      var at = links.indexOf(document.activeElement);
      var next = event.key === "j" ? Math.min(at + 1, links.length - 1) : Math.max(at - 1, 0);
      links[next].focus();
      event.preventDefault();
      return;
    }
    var target = document.querySelector('[data-key="' + event.key + '"]');
    if (!target) {
      return;
    }
    event.preventDefault();
    if (target.tagName === "BUTTON") {
      target.click();
    } else {
      target.focus();
    }
  });
})();
