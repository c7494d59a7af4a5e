// The live view: one row per delivery, updated in place as the server sends changes.
(function () {
  "use strict";
  var table = document.getElementById("live");
  var state = document.getElementById("live-state");
  if (!table) return;
  var body = table.querySelector("tbody");
  var rows = {};
  var source = new EventSource(table.getAttribute("data-src"));
  source.onopen = function () { state.textContent = "live"; };
  source.onerror = function () { state.textContent = "reconnecting…"; };
  source.addEventListener("end", function (e) { state.textContent = "stream ended: " + e.data; });
  source.addEventListener("delivery", function (e) {
    var d = JSON.parse(e.data);
    var row = rows[d.id];
    if (!row) {
      row = document.createElement("tr");
      row.className = "live-delivery";
      row.setAttribute("data-id", d.id);
      body.insertBefore(row, body.firstChild);
      rows[d.id] = row;
    }
    row.textContent = "";
    var link = document.createElement("a");
    link.href = "/console/deliveries/" + encodeURIComponent(d.id);
    link.textContent = d.id;
    var cells = [link, d.event_type, d.status, String(d.attempts),
      d.last_status_code ? String(d.last_status_code) : "—", d.updated_at];
    cells.forEach(function (value, i) {
      var cell = document.createElement("td");
      if (typeof value === "string") cell.textContent = value; else cell.appendChild(value);
      if (i === 2) cell.className = "status " + d.status;
      row.appendChild(cell);
    });
  });
})();
