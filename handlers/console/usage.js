// The Usage view: GET /v1/admin/usage and GET /v1/admin/requests.

import { fetchAdmin } from "./admin.js";
import { cell, fillRows, formatNumber, formatTime } from "./tables.js";

const SCOPES = {
  process: "Counted by the gateway process that answered (in memory): other processes count their own.",
  shared: "Counted in Redis: every gateway process sharing it is included.",
};

function formatCost(cost) {
  return cost === null || cost === undefined ? "–" : Number(cost).toFixed(4);
}

const USAGE_COLUMNS = [
  { label: "Key", value: (row) => row.key },
  { label: "Deployment", value: (row) => row.deployment },
  { label: "Requests", value: (row) => formatNumber(row.requests), number: true },
  { label: "Prompt tokens", value: (row) => formatNumber(row.prompt_tokens), number: true },
  { label: "Completion tokens", value: (row) => formatNumber(row.completion_tokens), number: true },
  { label: "Total tokens", value: (row) => formatNumber(row.total_tokens), number: true },
  { label: "Cost", value: (row) => formatCost(row.cost), number: true },
];

function leftOf(remaining, limit) {
  return limit === null || limit === undefined
    ? "no limit"
    : `${formatNumber(remaining)} of ${formatNumber(limit)}`;
}

const QUOTA_COLUMNS = [
  { label: "Key", value: (quota) => quota.key },
  { label: "Requests left", value: (q) => leftOf(q.remaining_requests, q.rpm), number: true },
  { label: "Tokens left", value: (q) => leftOf(q.remaining_tokens, q.tpm), number: true },
  { label: "Resets in", value: (q) => `${q.resets_in_seconds} s`, number: true },
];

function milliseconds(value) {
  return value === null || value === undefined ? "–" : `${Math.round(value)} ms`;
}

const REQUEST_COLUMNS = [
  { label: "Time", value: (r) => formatTime(r.time) },
  { label: "Request id", value: (r) => r.request_id },
  { label: "Route", value: (r) => r.route },
  {
    label: "Status",
    value: (r) => r.status,
    number: true,
    className: (r) => (r.status >= 400 ? "status-error" : ""),
  },
  { label: "Key", value: (r) => r.key },
  { label: "Deployment", value: (r) => r.deployment },
  { label: "Attempts", value: (r) => r.attempts, number: true },
  { label: "Duration", value: (r) => milliseconds(r.duration_ms), number: true },
  { label: "First token", value: (r) => milliseconds(r.ttft_ms), number: true },
  {
    label: "Tokens (in / out)",
    value: (r) =>
      r.prompt_tokens === undefined && r.completion_tokens === undefined
        ? "–"
        : `${formatNumber(r.prompt_tokens)} / ${formatNumber(r.completion_tokens)}`,
    number: true,
  },
];

function fillTotals(tfoot, totals, hasRows) {
  if (!hasRows) {
    tfoot.replaceChildren();
    return;
  }
  const tr = document.createElement("tr");
  const values = [
    "Total",
    "all",
    formatNumber(totals.requests),
    formatNumber(totals.prompt_tokens),
    formatNumber(totals.completion_tokens),
    formatNumber(totals.total_tokens),
    formatCost(totals.cost),
  ];
  values.forEach((value, index) => {
    tr.append(cell(value, { label: USAGE_COLUMNS[index].label, number: index >= 2 }));
  });
  tfoot.replaceChildren(tr);
}

export async function loadUsage(section) {
  const [usage, recent] = await Promise.all([
    fetchAdmin("/v1/admin/usage"),
    fetchAdmin("/v1/admin/requests?limit=50"),
  ]);
  section.querySelector('[data-field="scope"]').textContent =
    `${SCOPES[usage.scope] ?? ""} As of ${formatTime(usage.time)}.`.trim();
  fillRows(section.querySelector("#usage-table tbody"), usage.rows, USAGE_COLUMNS, "No usage yet.");
  fillTotals(section.querySelector("#usage-table tfoot"), usage.totals, usage.rows.length > 0);
  fillRows(
    section.querySelector("#quota-table tbody"),
    usage.quotas,
    QUOTA_COLUMNS,
    "No key has a rate limit.",
  );
  fillRows(
    section.querySelector("#requests-table tbody"),
    recent.requests,
    REQUEST_COLUMNS,
    "No requests yet.",
  );
}
