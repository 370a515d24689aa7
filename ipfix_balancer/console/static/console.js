// Progressive enhancement only: every page works without it.
// [data-refresh]: reload that part of the page every data-every ms (a logged-out session goes to the login page).
// form[data-confirm]: ask before submitting (Delete).
document.querySelectorAll("[data-refresh]").forEach(function (box) {
  var every = parseInt(box.dataset.every || "3000", 10);
  setInterval(function () {
    fetch(box.dataset.refresh, {credentials: "same-origin"}).then(function (r) {
      if (r.redirected) { window.location = r.url; return null; }
      return r.ok ? r.text() : null;
    }).then(function (html) { if (html !== null) { box.innerHTML = html; bindConfirm(box); } })
      .catch(function () {});
  }, every);
});
function bindConfirm(root) {
  root.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (e) {
      if (!window.confirm(form.dataset.confirm)) { e.preventDefault(); }
    });
  });
}
bindConfirm(document);
