/* Needle: keyboard shortcuts and the copy-permalink button.
 *
 * Progressive enhancement only: every page works without this file. It is a static file
 * (the Content-Security-Policy allows script-src 'self' and no inline scripts or handlers).
 *
 * Keys (ignored while typing in a field, and with Ctrl, Alt or Meta held):
 *   j  next neuron       (the neuron page's a[rel=next] in nav.neighbours)
 *   k  previous neuron   (its a[rel=prev])
 *   /  focus the search box (#search-q in the header)
 *   r  a random neuron of the current model (body[data-random-url])
 *   ?  show or hide the list of shortcuts (footer details#shortcuts, floating at the window's corner)
 *   Escape  leave the search box, or close the list of shortcuts
 *
 * button.copy-permalink copies its data-url to the clipboard and then reads "Copied" for 2 s.
 * An htmx request answered with an error shows the error panel in place of the result.
 */
(function () {
  "use strict";

  function isTyping(target) {
    if (!target || target === document.body) return false;
    if (target.isContentEditable) return true;
    var tag = target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT";
  }

  function follow(selector) {
    var link = document.querySelector(selector);
    if (!link || !link.href) return false;
    window.location.assign(link.href);
    return true;
  }

  function focusSearch() {
    var box = document.getElementById("search-q") || document.querySelector("main input[type=search]");
    if (!box) return false;
    box.focus();
    if (box.select) box.select();
    return true;
  }

  function randomNeuron() {
    var url = document.body && document.body.getAttribute("data-random-url");
    if (!url) return false;
    window.location.assign(url);
    return true;
  }

  function toggleHelp() {
    var help = document.getElementById("shortcuts");
    if (!help) return false;
    help.open = !help.open;  /* open, it floats at the window's corner (style.css): no scrolling */
    return true;
  }

  /* Escape: leaves a search box (so the other keys work again), or closes the shortcut list */
  function escape(target) {
    if (target && target.tagName === "INPUT" && target.type === "search") {
      target.blur();
      return true;
    }
    var help = document.getElementById("shortcuts");
    if (help && help.open) {
      help.open = false;
      return true;
    }
    return false;
  }

  var KEYS = {
    j: function () { return follow('nav.neighbours a[rel~="next"]'); },
    k: function () { return follow('nav.neighbours a[rel~="prev"]'); },
    "/": focusSearch,
    r: randomNeuron,
    "?": toggleHelp
  };

  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    if (event.key === "Escape") {
      if (escape(event.target)) event.preventDefault();
      return;
    }
    if (isTyping(event.target)) return;
    var action = Object.prototype.hasOwnProperty.call(KEYS, event.key) ? KEYS[event.key] : null;
    if (action && action()) event.preventDefault();
  });

  /* ------------------------------------------------------------ errors in htmx panels */

  /* htmx leaves the page as it was when an answer is an error (4xx, 5xx). Needle answers an htmx
     request's error with a small panel (templates/_error_panel.html) carrying the target's id:
     swap it in, so "too many requests", a bad value or a switched-off live request is shown
     where the result would have been. */
  document.addEventListener("htmx:beforeSwap", function (event) {
    var detail = event.detail;
    if (detail && detail.xhr && detail.xhr.status >= 400 && detail.xhr.status < 600) {
      detail.shouldSwap = true;
      detail.isError = false;
    }
  });

  /* ------------------------------------------------------------ copy permalink */
  var COPIED_MS = 2000;

  function copyWithSelection(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.top = "-1000px";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try {
      ok = document.execCommand("copy");
    } catch (e) {
      ok = false;
    }
    document.body.removeChild(area);
    return ok;
  }

  function copy(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).then(
        function () { return true; },
        function () { return copyWithSelection(text); }
      );
    }
    return Promise.resolve(copyWithSelection(text));
  }

  document.addEventListener("click", function (event) {
    var button = event.target && event.target.closest ? event.target.closest("button.copy-permalink") : null;
    if (!button) return;
    var url = button.getAttribute("data-url");
    if (!url) return;
    var label = button.getAttribute("data-label") || button.textContent;
    button.setAttribute("data-label", label);
    copy(url).then(function (ok) {
      button.textContent = ok ? "Copied" : "Press Ctrl+C to copy";
      if (ok) {  /* back to its label, ready for the next copy */
        clearTimeout(button.needleReset);
        button.needleReset = setTimeout(function () { button.textContent = label; }, COPIED_MS);
      } else {
        var link = document.querySelector("a.permalink-url");
        var range = document.createRange && link ? document.createRange() : null;
        if (range) {
          range.selectNodeContents(link);
          var selection = window.getSelection();
          selection.removeAllRanges();
          selection.addRange(range);
        }
      }
    });
  });
})();
