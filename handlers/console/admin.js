// The admin key and the /v1/admin/... documents (their shapes: gateway/ops/admin.py).
// The key lives in sessionStorage only: it goes when the tab closes.

const STORAGE_KEY = "azure-gpt-api.admin-key";

/** The gateway refused the admin key (401) or the key is not an admin key (403). */
export class AdminKeyError extends Error {
  constructor(status, message, hadKey) {
    super(message);
    this.status = status;
    this.hadKey = hadKey;
  }
}

export function adminKey() {
  return sessionStorage.getItem(STORAGE_KEY);
}

export function rememberAdminKey(key) {
  sessionStorage.setItem(STORAGE_KEY, key);
}

export function forgetAdminKey() {
  sessionStorage.removeItem(STORAGE_KEY);
}

/** The message of an error answer, in the OpenAI shape or the original envelope. */
export async function errorMessage(response) {
  const fallback = `HTTP ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    return body?.error?.message || body?.message || fallback;
  } catch {
    return fallback;
  }
}

/** GET an admin document; throws AdminKeyError when the key is missing or wrong. */
export async function fetchAdmin(path) {
  const key = adminKey();
  const headers = { Accept: "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    throw new AdminKeyError(response.status, await errorMessage(response), Boolean(key));
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}
