// Moorage console: small progressive enhancements. Every page works without it but for the
// auto-refresh of the cluster and garbage collection pages. Nothing here builds HTML from
// strings: text goes in through textContent, so no server value can become markup.
"use strict";

(function () {
  // Buttons that ask first: <button data-confirm="...">.
  document.addEventListener("submit", function (event) {
    var button = event.submitter;
    var message = button && button.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });

  // Copy buttons: <button data-copy="input-id">.
  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-copy]") : null;
    if (!button) return;
    var input = document.getElementById(button.getAttribute("data-copy"));
    if (!input) return;
    input.select();
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(input.value).then(done, function () { document.execCommand("copy"); done(); });
    } else {
      document.execCommand("copy");
      done();
    }
  });

  // Selects that apply at once (per-page counts).
  document.querySelectorAll("select.autosubmit").forEach(function (select) {
    select.addEventListener("change", function () { select.form.requestSubmit(); });
  });

  // Times: "5 minutes ago" stays current without reloading.
  function ago(iso) {
    var seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    var units = [[86400, "day"], [3600, "hour"], [60, "minute"]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][0]) {
        var n = Math.floor(seconds / units[i][0]);
        return n + " " + units[i][1] + (n === 1 ? "" : "s") + " ago";
      }
    }
    return seconds + " second" + (seconds === 1 ? "" : "s") + " ago";
  }
  setInterval(function () {
    document.querySelectorAll("time[datetime]").forEach(function (t) {
      t.textContent = ago(t.getAttribute("datetime"));
    });
  }, 30000);

  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  // Poll a JSON endpoint every second; the next request starts when the last one ended.
  function poll(url, render, interval) {
    var stopped = false;
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" }, cache: "no-store" })
        .then(function (r) {
          if (r.status === 401) { stopped = true; window.location.reload(); return null; }
          return r.ok ? r.json() : null;
        })
        .then(function (data) { if (data) stopped = render(data) === false; })
        .catch(function () { /* the replica serving this page may be restarting: try again */ })
        .finally(function () { if (!stopped) setTimeout(tick, interval); });
    }
    setTimeout(tick, interval);
  }

  var cluster = document.getElementById("cluster");
  if (cluster) {
    poll(cluster.getAttribute("data-poll"), function (c) {
      var set = function (field, text) {
        var node = cluster.querySelector('[data-field="' + field + '"]');
        if (node) node.textContent = text;
      };
      set("healthy", c.healthy + " of " + c.replicas.length);
      set("tolerates", plural(c.tolerates, "failure"));
      set("tolerates_when_healthy", plural(c.tolerates_when_healthy, "failure"));
      set("quorum", c.quorum ? "held" : "lost");
      var body = document.querySelector("#replicas tbody");
      var rows = document.createDocumentFragment();
      c.replicas.forEach(function (r) {
        var tr = el("tr", null, "state-" + r.state);
        tr.setAttribute("data-replica", r.id);
        var th = el("th", r.id, "mono");
        th.scope = "row";
        tr.appendChild(th);
        var td = el("td");
        td.appendChild(el("span", r.state, "health " + r.state));
        tr.appendChild(td);
        tr.appendChild(el("td", r.role));
        tr.appendChild(el("td", r.lag === null ? "–" : r.lag, "num"));
        tr.appendChild(el("td", r.version || "–"));
        tr.appendChild(el("td", r.seen_ago));
        tr.appendChild(el("td", r.url || "–", "mono"));
        tr.appendChild(el("td", r.api));
        rows.appendChild(tr);
      });
      body.replaceChildren(rows);
      var warnings = document.getElementById("cluster-warnings");
      warnings.replaceChildren.apply(warnings, c.warnings.map(function (w) {
        return el("li", w.text, "notice " + w.level);
      }));
      var updated = document.getElementById("cluster-updated");
      if (updated) updated.textContent = "Updated " + new Date(c.time * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
    }, 1000);
  }

  var gc = document.getElementById("gc");
  if (gc && gc.getAttribute("data-running") === "true") {
    poll(gc.getAttribute("data-poll"), function (data) {
      var running = false;
      data.runs.forEach(function (run) {
        if (run.state === "running") running = true;
        var row = gc.querySelector('tr[data-run="' + CSS.escape(run.id) + '"]');
        if (!row) return;
        var set = function (field, text) {
          var node = row.querySelector('[data-field="' + field + '"]');
          if (node) node.textContent = text;
        };
        set("state", run.state);
        set("phase", run.phase);
        set("manifests_swept", run.manifests_swept);
        set("blobs_swept", run.blobs_swept);
        set("bytes_freed", run.bytes_freed + " B");
        set("error", run.error || "");
        set("finished", run.finished ? new Date(run.finished * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "–");
      });
      if (!running) { window.location.reload(); return false; }
    }, 1000);
  }
})();

// Pull-command popovers close on Escape and on a click elsewhere, as menus do.
document.addEventListener("click", function (event) {
  document.querySelectorAll("details.pull[open]").forEach(function (d) {
    if (!d.contains(event.target)) d.removeAttribute("open");
  });
});
document.addEventListener("keydown", function (event) {
  if (event.key !== "Escape") return;
  document.querySelectorAll("details.pull[open]").forEach(function (d) {
    d.removeAttribute("open");
    d.querySelector("summary").focus();
  });
});
