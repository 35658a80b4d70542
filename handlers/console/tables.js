// Table rows from data, text only: nothing from the gateway is ever parsed as HTML.

/** A <td> with `text`, labelled for the phone layout by its column's header. */
export function cell(text, { label = "", number = false, className = "" } = {}) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined || text === "" ? "–" : String(text);
  if (label) td.dataset.label = label;
  if (number) td.classList.add("number");
  if (className) td.classList.add(className);
  return td;
}

/** Replace `tbody`'s rows: one per item, its cells from `columns` [{label, value, number}]. */
export function fillRows(tbody, items, columns, emptyText) {
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    for (const column of columns) {
      tr.append(
        cell(column.value(item), {
          label: column.label,
          number: column.number,
          className: column.className ? column.className(item) : "",
        }),
      );
    }
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(emptyText, { className: "empty" });
    td.colSpan = columns.length;
    tr.append(td);
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
}

export function formatNumber(value) {
  return value === null || value === undefined ? "–" : Number(value).toLocaleString("en");
}

export function formatTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleTimeString("en-GB");
}
