// The Deployments view: GET /v1/admin/deployments.

import { fetchAdmin } from "./admin.js";
import { fillRows, formatNumber, formatTime } from "./tables.js";

function stateText(deployment) {
  if (deployment.state !== "cooling_down") return "ready";
  const until = formatTime(deployment.cooling_down_until);
  return `cooling down until ${until} (${deployment.cooling_down_seconds} s)`;
}

function recentText({ requests, errors, error_rate: rate, window_seconds: window }) {
  if (!requests) return `no requests in ${window} s`;
  return `${errors} of ${requests} (${Math.round(rate * 100)} %) in ${window} s`;
}

const COLUMNS = [
  { label: "Name", value: (d) => d.name },
  { label: "Azure deployment", value: (d) => (d.host ? `${d.deployment} @ ${d.host}` : d.deployment) },
  { label: "State", value: stateText, className: (d) => `state-${d.state}` },
  { label: "Weight", value: (d) => d.weight, number: true },
  { label: "Priority", value: (d) => d.priority, number: true },
  { label: "In flight", value: (d) => d.in_flight, number: true },
  {
    label: "Azure remaining (requests / tokens)",
    value: (d) =>
      `${formatNumber(d.azure_remaining_requests)} / ${formatNumber(d.azure_remaining_tokens)}`,
    number: true,
  },
  { label: "Recent errors", value: (d) => recentText(d.recent) },
];

export async function loadDeployments(section) {
  const report = await fetchAdmin("/v1/admin/deployments");
  section.querySelector('[data-field="time"]').textContent = `As of ${formatTime(report.time)}`;
  fillRows(
    section.querySelector("#deployments-table tbody"),
    report.deployments,
    COLUMNS,
    "No deployments are configured.",
  );
}
