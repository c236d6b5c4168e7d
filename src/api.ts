/**
 * Talking to the server extension: REST through ServerConnection (so the XSRF cookie and token go with
 * every request, as for JupyterLab's own services) and the URL of the snapshot websocket.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { ScaleBody } from './validate';
import { ISnapshot } from './wire';

const PREFIX = 'jupyter-gpu/api';

/** An error the server explained (its JSON ``message`` / ``error``), to show as is in the panel. */
export class PanelApiError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
  }
}

async function request<T>(path: string, init: RequestInit = {}, settings?: ServerConnection.ISettings): Promise<T> {
  const s = settings ?? ServerConnection.makeSettings();
  const url = URLExt.join(s.baseUrl, PREFIX, path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, s);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let data: any = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { message: text };
    }
  }
  if (!response.ok) {
    const message = (data && (data.message || data.error || data.reason)) || response.statusText;
    throw new PanelApiError(String(message), response.status);
  }
  return data as T;
}

export function fetchSnapshot(settings?: ServerConnection.ISettings): Promise<ISnapshot> {
  return request<ISnapshot>('snapshot', { method: 'GET' }, settings);
}

export function startPool(
  settings?: ServerConnection.ISettings
): Promise<{ started: boolean; address?: string; error?: string }> {
  return request('pool', { method: 'POST', body: '{}' }, settings);
}

export function scalePool(
  body: ScaleBody,
  settings?: ServerConnection.ISettings
): Promise<{ workers?: number; error?: string }> {
  return request('scale', { method: 'POST', body: JSON.stringify(body) }, settings);
}

export function cancelWork(
  id: string,
  settings?: ServerConnection.ISettings
): Promise<{ cancelled: boolean; what: string }> {
  return request(`cancel/${encodeURIComponent(id)}`, { method: 'POST', body: '{}' }, settings);
}

/** The stream websocket's URL; the token rides along where the page has one (as for kernel sockets). */
export function streamUrl(settings?: ServerConnection.ISettings): string {
  const s = settings ?? ServerConnection.makeSettings();
  let url = URLExt.join(s.wsUrl, PREFIX, 'stream');
  if (s.token && s.appendToken) {
    url += `?token=${encodeURIComponent(s.token)}`;
  }
  return url;
}
