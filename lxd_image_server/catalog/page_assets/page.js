
(function () {
  "use strict";
  var loc = window.location;
  if (loc.protocol === "https:" || loc.protocol === "http:") {
    document.querySelectorAll(".origin").forEach(function (el) {
      el.textContent = loc.origin;
    });
  }

  function textOf(button) {
    if (button.dataset.copy) {
      return button.dataset.copy;
    }
    var code = button.closest(".cmd").querySelector("code");
    return code.textContent;
  }

  function flash(button, label) {
    button.textContent = label;
    button.classList.add("done");
    window.setTimeout(function () {
      button.textContent = button.dataset.label;
      button.classList.remove("done");
    }, 2000);
  }

  function selectForManualCopy(button, text) {
    var box = button.parentElement.querySelector("input.manual");
    if (!box) {
      box = document.createElement("input");
      box.className = "manual";
      box.readOnly = true;
      button.parentElement.appendChild(box);
    }
    box.value = text;
    box.focus();
    box.select();
    flash(button, "press Ctrl+C");
  }

  document.querySelectorAll("button.copy").forEach(function (button) {
    button.dataset.label = button.textContent;
    button.hidden = false;
    button.addEventListener("click", function () {
      var text = textOf(button);
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(function () {
          flash(button, "copied");
        }, function () {
          selectForManualCopy(button, text);
        });
      } else {
        selectForManualCopy(button, text);
      }
    });
  });

  var filter = document.getElementById("filter");
  if (filter) {
    filter.hidden = false;
    filter.addEventListener("input", function () {
      var words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      document.querySelectorAll(".product").forEach(function (card) {
        var hay = card.dataset.search;
        card.hidden = !words.every(function (w) { return hay.indexOf(w) !== -1; });
      });
    });
  }
})();
