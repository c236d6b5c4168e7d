/** The panel's GPU icon: an inline SVG so it needs no asset loader and follows the theme's icon colour. */
import { LabIcon } from '@jupyterlab/ui-components';

const GPU_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M2 7h18a2 2 0 0 1 2 2v7a2 2 0 0 1-2 2h-1v2h-2v-2H7v2H5v-2H4v2H2zm2 2v7h16V9zm2 1.5h5v4H6zm7 0h5v4h-5z"/>
    <rect x="6" y="4" width="1.6" height="3"/>
    <rect x="9.5" y="4" width="1.6" height="3"/>
    <rect x="13" y="4" width="1.6" height="3"/>
    <rect x="16.5" y="4" width="1.6" height="3"/>
  </g>
</svg>`;

export const gpuIcon = new LabIcon({ name: 'jupyter-gpu:gpu', svgstr: GPU_SVG });
