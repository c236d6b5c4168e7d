/**
 * The live snapshot feed: one websocket to the server's shared poller, with a Lumino Poll as the fallback
 * and reconnect driver.
 *
 * While the socket is open the server pushes a snapshot every update interval and the Poll only checks the
 * socket. When it is closed (server restart, proxy timeout) each Poll tick fetches one snapshot over REST
 * and tries to reopen the socket, backing off on errors. ``standby: 'when-hidden'`` stops all of it while the
 * browser tab is hidden, and the socket is closed then too, so a forgotten tab costs the pool nothing.
 */
import { ServerConnection } from '@jupyterlab/services';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { fetchSnapshot, streamUrl } from './api';
import { ISnapshot } from './wire';

export class SnapshotFeed {
  /**
   * @param options.transform applied to every snapshot before it is published (the plugin maps the
   * notebooks of this server's kernels to their document paths, see notebooks.ts)
   */
  constructor(
    options: {
      interval?: number;
      settings?: ServerConnection.ISettings;
      transform?: (snapshot: ISnapshot) => ISnapshot;
    } = {}
  ) {
    this._settings = options.settings ?? ServerConnection.makeSettings();
    this._transform = options.transform ?? (snapshot => snapshot);
    this._interval = (options.interval ?? 1) * 1000;
    this._poll = new Poll({
      auto: false,
      factory: () => this._tick(),
      frequency: { interval: this._interval, backoff: true, max: 30 * 1000 },
      name: 'jupyter-gpu:snapshot',
      standby: () => {
        if (typeof document !== 'undefined' && document.hidden) {
          this._closeSocket();
          return true;
        }
        return false;
      }
    });
  }

  /** Fires with every new snapshot, whichever way it came. */
  get changed(): ISignal<this, ISnapshot> {
    return this._changed;
  }

  get latest(): ISnapshot | null {
    return this._latest;
  }

  /** Whether snapshots come over the websocket right now (else by REST polling). */
  get live(): boolean {
    return this._socket !== null && this._socket.readyState === WebSocket.OPEN;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  start(): void {
    void this._poll.start();
  }

  /** Fetch now (after an action such as Start or Cancel) rather than at the next tick. */
  async refresh(): Promise<void> {
    if (this.live) {
      this._socket!.send('refresh');
    } else {
      await this._poll.refresh();
    }
  }

  setInterval(seconds: number): void {
    const ms = Math.max(0.2, seconds) * 1000;
    if (ms === this._interval) {
      return;
    }
    this._interval = ms;
    this._poll.frequency = { interval: ms, backoff: true, max: 30 * 1000 };
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._closeSocket();
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _tick(): Promise<void> {
    if (this.live) {
      return; // pushes arrive on their own
    }
    this._openSocket();
    // Until the socket delivers, keep the panel current over REST; a failure here makes the Poll back off.
    this._emit(await fetchSnapshot(this._settings));
  }

  private _openSocket(): void {
    if (this._socket && this._socket.readyState === WebSocket.CONNECTING) {
      return;
    }
    this._closeSocket();
    let socket: WebSocket;
    try {
      socket = new WebSocket(streamUrl(this._settings));
    } catch (error) {
      console.warn('jupyter-gpu: cannot open the snapshot stream', error);
      return;
    }
    socket.onmessage = event => {
      try {
        this._emit(JSON.parse(String(event.data)) as ISnapshot);
      } catch (error) {
        console.warn('jupyter-gpu: bad snapshot message', error);
      }
    };
    socket.onclose = () => {
      if (this._socket === socket) {
        this._socket = null;
        if (!this._disposed) {
          void this._poll.refresh(); // fall back to REST at once, and retry the socket
        }
      }
    };
    this._socket = socket;
  }

  private _closeSocket(): void {
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      socket.onclose = null;
      socket.onmessage = null;
      socket.close();
    }
  }

  private _emit(snapshot: ISnapshot): void {
    if (this._disposed) {
      return;
    }
    try {
      snapshot = this._transform(snapshot);
    } catch (error) {
      console.warn('jupyter-gpu: cannot adapt the snapshot', error);
    }
    this._latest = snapshot;
    this._changed.emit(snapshot);
  }

  private _settings: ServerConnection.ISettings;
  private _transform: (snapshot: ISnapshot) => ISnapshot;
  private _interval: number;
  private _poll: Poll;
  private _socket: WebSocket | null = null;
  private _latest: ISnapshot | null = null;
  private _disposed = false;
  private _changed = new Signal<this, ISnapshot>(this);
}
