/**
 * Screenshots for the documentation. A normal test run keeps its screenshots in its own output folder
 * (test-results/, ignored by git) and never writes docs/images/: a test must not change tracked files.
 * Asked to, it also copies them there:
 *
 * - JUPYTER_GPU_DOCS_IMAGES=1: the pictures the docs show (docs/images/panel.png, progress-widget.png);
 * - JUPYTER_GPU_DOCS_SHOTS=PREFIX: before/after pictures, as docs/images/PREFIX-NAME.png.
 */
import * as fs from 'fs';
import * as path from 'path';

const DOCS = path.join(__dirname, '..', '..', 'docs', 'images');

function copy(shot: string, name: string): void {
  fs.mkdirSync(DOCS, { recursive: true });
  fs.copyFileSync(shot, path.join(DOCS, name));
}

/** One of the docs' own pictures, refreshed when JUPYTER_GPU_DOCS_IMAGES is set. */
export function docsImage(shot: string, name: string): void {
  if (process.env.JUPYTER_GPU_DOCS_IMAGES) {
    copy(shot, name);
  }
}

/** A before/after picture, kept as PREFIX-NAME when JUPYTER_GPU_DOCS_SHOTS=PREFIX is set. */
export function docsShot(shot: string, name: string): void {
  const prefix = process.env.JUPYTER_GPU_DOCS_SHOTS;
  if (prefix) {
    copy(shot, `${prefix}-${name}`);
  }
}
