// The console page: inserts the HTML fragments the server pushes over Server-Sent Events,
// sends the form and cancels, and loads older archive pages as they scroll into view.
// Fragments are escaped by the server; this script never builds markup from data.
(function () {
  "use strict";
  const prefix = "/console";
  const headers = { "X-Console": "1" };
  const byId = (root, id) => Array.from(root.children).find((el) => el.dataset.id === id);

  function fragment(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    return template.content.firstElementChild;
  }

  function connect() {
    const source = new EventSource(prefix + "/events");
    const status = document.getElementById("connection");
    source.onopen = () => { status.textContent = "live"; status.className = "on"; };
    source.onerror = () => { status.textContent = "reconnecting…"; status.className = "off"; };
    source.addEventListener("card", (e) => {
      const data = JSON.parse(e.data);
      const cards = document.getElementById("cards");
      if (byId(cards, data.id)) return;
      cards.prepend(fragment(data.html));
      while (cards.children.length > data.keep) cards.lastElementChild.remove();
    });
    source.addEventListener("running", (e) => {
      const data = JSON.parse(e.data);
      const list = document.getElementById("running");
      const row = fragment(data.html);
      const old = byId(list, data.id);
      if (old) old.replaceWith(row); else list.append(row);
    });
    source.addEventListener("done", (e) => {
      const old = byId(document.getElementById("running"), JSON.parse(e.data).id);
      if (old) old.remove();
    });
    source.addEventListener("generators", (e) => {
      document.getElementById("generators-box").innerHTML = JSON.parse(e.data).html;
    });
    source.addEventListener("reload", () => { source.close(); location.reload(); });
  }

  document.getElementById("render-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const out = document.getElementById("form-status");
    out.textContent = "sending…";
    const response = await fetch(prefix + "/render", { method: "POST", body: new FormData(e.target), headers });
    const body = await response.json();
    out.textContent = response.ok ? "sent " + body.request_id : "refused: " + body.error;
    out.dataset.requestId = response.ok ? body.request_id : "";
  });

  document.getElementById("running").addEventListener("click", async (e) => {
    const button = e.target.closest("button.cancel");
    if (!button) return;
    button.disabled = true;
    await fetch(prefix + "/cancel/" + encodeURIComponent(button.dataset.id), { method: "POST", headers });
  });

  const more = document.getElementById("more");
  let loading = false;
  const observer = new IntersectionObserver(async (entries) => {
    if (!entries.some((entry) => entry.isIntersecting) || loading) return;
    const pages = document.querySelectorAll("#archive .page");
    const next = pages.length ? pages[pages.length - 1].dataset.next : "";
    if (!next) return;
    loading = true;
    const response = await fetch(prefix + "/archive?before=" + encodeURIComponent(next));
    document.getElementById("archive").append(fragment(await response.text()));
    loading = false;
    observer.unobserve(more); // re-arm: fires again at once if the sentinel is still in view
    observer.observe(more);
  });
  observer.observe(more);

  connect();
})();
