// Small accessibility repairs of the theme's controls (found by axe-core in the site test).
// A control's accessible name must contain the text it shows (WCAG 2.5.3, "label in name"):
// - the search field shows "Search Ctrl+K" and a folded code cell's toggle shows "Show code
//   cell source", but their labels say "Search" and "Toggle hidden content": where a control
//   shows text that its label lacks, the text names it;
// - the colour-mode button shows one icon whose tooltip ("Light", "Dark", ...) is not in its
//   label "Color mode": the label alone names it, and its icons are decoration.
// The bibliography's list (sphinxcontrib-bibtex) holds entries with a deprecated DPUB role
// that is not a list item: they become list items.
(function () {
  function repair() {
    document.querySelectorAll("button[aria-label], summary[aria-label]").forEach(function (el) {
      var shown = (el.innerText || "").replace(/\s+/g, " ").trim().toLowerCase();
      var label = el.getAttribute("aria-label").toLowerCase();
      if (shown && label.indexOf(shown) < 0) { el.removeAttribute("aria-label"); }
    });
    document.querySelectorAll(".theme-switch-button i, .theme-switch-button svg")
      .forEach(function (el) {
        el.removeAttribute("title");
        el.removeAttribute("aria-labelledby");
        el.removeAttribute("role");
        el.setAttribute("aria-hidden", "true");
        el.querySelectorAll("title").forEach(function (t) { t.remove(); });
      });
    document.querySelectorAll(".citation-list > .citation[role]").forEach(function (el) {
      el.setAttribute("role", "listitem");
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    repair();
    // the icon font turns the <i> icons into <svg>s later, with titles: repair again then
    var observer = new MutationObserver(repair);
    document.querySelectorAll(".theme-switch-button").forEach(function (button) {
      observer.observe(button, {childList: true, subtree: true});
    });
  });
  window.addEventListener("load", repair);
})();
